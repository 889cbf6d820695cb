"""A model adapter written as data: where a DiT keeps its blocks, timestep and attention.

`AdapterSpec` names module paths and call conventions; `cachekit.declare_adapter(spec, Model)`
turns it into an adapter, with no code for DiTs whose structure fits (users' own, Open-Sora's,
and most diffusers families, whose built-in adapters are specs too).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from cachekit.schemas.checked import Checked

#: The places and built-in signals an adapter may declare missing (a signal of its own it declares
#: given, in `signals`).
PointName = Literal[
    "span", "attention", "mlp", "probe", "timestep_embedding", "projected_timestep_embedding", "latent", "output"
]
AttentionKind = Literal["spatial", "temporal", "cross"]


class _Spec(Checked):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Argument(_Spec):
    """One argument of a call, found by keyword or else by position."""

    name: str
    position: int | None = Field(default=None, ge=0, description="None: the argument is passed by keyword only.")


class TimestepSpec(_Spec):
    """The model's timestep argument, mapped to the 0-1000 training scale (1000 = pure noise)."""

    argument: Argument = Argument(name="timestep", position=1)
    scale: float = Field(default=1.0, description="0-1000 timestep = offset + scale * argument.")
    offset: float = 0.0
    schedule: Literal["timestep", "argument", "call"] | None = Field(
        default=None,
        description="How the scheduler's timesteps of the model's pipelines relate to the model's: 'timestep' "
        "they are its 0-1000 timesteps, 'argument' they are what it is called with (mapped as above: Mochi's "
        "run backwards), 'call' neither (Cosmos' EDM conditioning). With 'timestep' or 'argument' each step's "
        "timestep is taken from the scheduler, never read from a call (a host sync); with 'call' every call's "
        "is read; None: the first call's is read once to see.",
    )

    @model_validator(mode="after")
    def _not_constant(self) -> TimestepSpec:
        if self.scale == 0:
            raise ValueError("timestep.scale must not be 0: every call would look like the same step")
        return self


class OutputSpec(_Spec):
    """A module whose output, or one item of its output tuple, is a signal."""

    module: str = Field(description="Path of the module inside the model, e.g. 'time_text_embed'.")
    index: int | None = Field(default=None, ge=0, description="Item of the returned tuple; None: the whole output.")


class Gate(_Spec):
    """How a block gates a module's output before adding it to its stream: by one row of its
    modulation table plus the projected timestep (table-modulated blocks: PixArt, Latte, ...)."""

    table: str = "scale_shift_table"
    embedding: Argument = Field(description="The block's argument carrying the projected timestep.")
    row: int = Field(ge=0, description="The table's row holding this module's gate.")
    rows: int = Field(default=6, ge=1, description="Rows of the table.")


class BlockListSpec(_Spec):
    """A list of blocks the model runs in order, and how each block carries the token streams."""

    path: str = Field(description="Path of the block list (a ModuleList), e.g. 'transformer_blocks'.")
    streams: list[Argument] = Field(
        min_length=1, description="The block arguments the span carries (image tokens first, then e.g. text tokens)."
    )
    returns: list[int] | None = Field(
        default=None,
        description="Index of each stream in the returned tuple; None: the block returns its one stream bare.",
    )
    residual: Literal["span", "list", "block"] = Field(
        default="span",
        description="Where the model may re-lay the tokens, so a cached residual must end: 'span': nowhere (the "
        "list continues the previous 'span' list's residual); 'list': before the list; 'block': between its blocks.",
    )
    attention: dict[str, AttentionKind] = Field(
        default_factory=dict, description="Attention modules of each block (path inside the block) and their kind."
    )
    mlp: list[str] = Field(default_factory=list, description="Feed-forward modules of each block (path inside it).")
    gates: dict[str, Gate] = Field(
        default_factory=dict, description="Attention/MLP modules (path inside the block) whose output the block gates."
    )

    @model_validator(mode="after")
    def _returns_every_stream(self) -> BlockListSpec:
        if self.returns is None and len(self.streams) != 1:
            raise ValueError(
                f"{self.path}: a block carrying {len(self.streams)} streams must say where it returns each"
            )
        if self.returns is not None and len(self.returns) != len(self.streams):
            raise ValueError(f"{self.path}: 'returns' has {len(self.returns)} entries for {len(self.streams)} streams")
        if self.returns is not None and sorted(self.returns) != list(range(len(self.returns))):
            raise ValueError(
                f"{self.path}: 'returns' {self.returns} must give each stream its own position in the returned "
                f"tuple, 0 to {len(self.returns) - 1} (the block returns its streams and nothing else)"
            )
        return self


class LatentSpec(_Spec):
    """The noisy latent a transformer call is made on, and how its axes lie, so that it can be seen
    as (batch, channels, frames, height, width): B batch, C channels, T frames, H and W the grid,
    N packed tokens (laid on the grid by `ids` or `grid`; without either, one axis)."""

    argument: Argument = Argument(name="hidden_states", position=0)
    layout: Literal["BCTHW", "BCHW", "BTCHW", "BNC", "BTNC"] | None = Field(
        default=None, description="None: BCTHW for a 5-D latent, BCHW for a 4-D one."
    )
    ids: Argument | None = Field(
        default=None, description="Packed tokens: the argument holding each token's (frame, row, column)."
    )
    grid: list[Argument] | None = Field(
        default=None,
        min_length=2,
        max_length=3,
        description="Packed tokens in raster order: the arguments giving ([frames,] height, width).",
    )

    @model_validator(mode="after")
    def _tokens_laid_once(self) -> LatentSpec:
        if (self.ids is not None or self.grid is not None) and self.layout not in ("BNC", "BTNC"):
            raise ValueError("latent: ids and grid lay out packed tokens; give layout 'BNC' or 'BTNC'")
        if self.ids is not None and self.grid is not None:
            raise ValueError("latent: give ids or grid, not both")
        return self


class NormProbe(_Spec):
    """Probe = the first block's adaptive norm, called on the hidden states and block arguments."""

    kind: Literal["norm"] = "norm"
    module: str = Field(default="norm1", description="Path of the norm inside the first block.")
    arguments: dict[str, Argument] = Field(
        default_factory=dict, description="The norm's keyword -> the first block's argument passed as it."
    )
    index: int | None = Field(default=0, ge=0, description="Item of the norm's output tuple; None: the whole output.")
    dtype_argument: str | None = Field(
        default=None, description="The norm's keyword that takes the hidden states' dtype."
    )


class TableProbe(_Spec):
    """Probe = norm(hidden) * (1 + scale) + shift, with shift and scale taken from the first block's
    modulation table plus the projected timestep (PixArt, Latte, Sana, Wan, LTX, ...)."""

    kind: Literal["table"] = "table"
    norm: str = "norm1"
    table: str = "scale_shift_table"
    embedding: Argument = Field(description="The first block's argument carrying the projected timestep.")
    shift: int = Field(default=0, ge=0, description="Row of the table holding the attention's shift.")
    scale: int = Field(default=1, ge=0, description="Row of the table holding the attention's scale.")
    float32: bool = Field(default=False, description="The block normalises in float32.")


class AdapterSpec(_Spec):
    """Everything an adapter needs to know about one DiT's structure."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="Adapter name, as in presets and studies.")
    timestep: TimestepSpec = TimestepSpec()
    timestep_embedding: OutputSpec | Argument | None = Field(
        default=None,
        description="Where the timestep embedding the blocks are conditioned on comes out: a module's output, or "
        "an argument of the first block's calls (where the model sums it from several modules).",
    )
    projected_timestep_embedding: OutputSpec | Argument | None = Field(
        default=None,
        description="The timestep embedding projected into the blocks' modulation parameters (Wan's timestep_proj), "
        "if the model has one; unset: declared missing.",
    )
    latent: LatentSpec = LatentSpec()
    blocks: list[BlockListSpec] = Field(min_length=1, description="Block lists in the order the model runs them.")
    interleave: bool = Field(
        default=False, description="The lists' blocks run alternately (list 0 block 0, list 1 block 0, ...)."
    )
    probe: Annotated[NormProbe | TableProbe, Field(discriminator="kind")] | None = None
    signals: dict[str, OutputSpec | Argument] = Field(
        default_factory=dict,
        description="Further signals the model exposes, by name: a module's output, or an argument of the first "
        "block's calls. A strategy asks for one by its name.",
    )
    missing: dict[PointName, str] = Field(
        default_factory=dict,
        description="Places (span, attention, mlp) and signals (probe, timestep_embedding, latent, ...) the model "
        "does not have, each with the reason.",
    )
    missing_attention: dict[AttentionKind, str] = Field(
        default_factory=dict, description="Attention kinds the model does not have, each with the reason."
    )

    @model_validator(mode="after")
    def _consistent(self) -> AdapterSpec:
        given = {
            "probe": self.probe,
            "timestep_embedding": self.timestep_embedding,
            "projected_timestep_embedding": self.projected_timestep_embedding,
        }
        for point in given.keys() & self.missing.keys():
            if given[point] is not None:
                raise ValueError(f"{point!r} is both given and listed as missing")
        kinds = {kind for block_list in self.blocks for kind in block_list.attention.values()}
        for kind in kinds & self.missing_attention.keys():
            raise ValueError(f"attention kind {kind!r} is both declared on a block list and listed as missing")
        if self.interleave and len({len(block_list.streams) for block_list in self.blocks}) != 1:
            raise ValueError("interleaved block lists must carry the same streams")
        return self


#: The block arguments most diffusers DiTs share: (hidden_states, encoder_hidden_states, temb, ...).
HIDDEN = Argument(name="hidden_states", position=0)
ENCODER = Argument(name="encoder_hidden_states", position=1)
TEMB = Argument(name="temb", position=2)

#: Why a family lacks an attention kind, in the words most families share.
IMAGE_ONLY = "an image model has no temporal attention"
FULL_3D = "attention runs over all video tokens at once: there is no separate temporal attention"
JOINT_TEXT = "joint attention over the image or video tokens and the text tokens: there is no separate cross attention"

#: Blocks in `transformer_blocks` with self attention, cross attention to the text and an MLP, on
#: the hidden states alone (PixArt, Sana, Allegro, Cosmos).
SELF_CROSS_BLOCKS = BlockListSpec(
    path="transformer_blocks",
    streams=[HIDDEN],
    attention={"attn1": "spatial", "attn2": "cross"},
    mlp=["ff"],
)
