"""Pyramid Attention Broadcast's config and its published per-family defaults."""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, model_validator

from cachekit.schemas.checked import Checked
from cachekit.schemas.configs import StrategyConfig

__all__ = [
    "PAB_DEFAULTS",
    "PAB_FALLBACK",
    "PAB_GATED",
    "PAB_MLP_DEFAULTS",
    "Broadcast",
    "MLPBroadcast",
    "MLPBroadcastAt",
    "PABConfig",
]


class Broadcast(Checked):
    """Recompute a module every `range`-th call and reuse its output in between, but only while
    the timestep is strictly inside `window`; outside it, always compute."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    range: int = Field(ge=1, le=1000, description="Recompute every N-th call (1 = never reuse).")
    window: tuple[float, float] = Field(default=(100.0, 800.0), description="(low, high), 0-1000 timestep scale.")

    @model_validator(mode="after")
    def _ordered_window(self) -> Broadcast:
        low, high = self.window
        if not 0 <= low < high <= 1000:
            raise ValueError(
                f"window must satisfy 0 <= low < high <= 1000 (the training timestep scale), got {self.window}"
            )
        if high <= 1:
            warnings.warn(
                f"window {self.window} lies below timestep 1 and will hardly ever apply: windows are on the 0-1000 "
                f"scale, not the 0-1 sigma scale (did you mean ({low * 1000:g}, {high * 1000:g})?)",
                UserWarning,
                stacklevel=2,
            )
        return self


class MLPBroadcast(Broadcast):
    """Broadcast the MLP output of the chosen blocks (indices into the model's block order)."""

    blocks: tuple[int, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _valid_blocks(self) -> MLPBroadcast:
        if min(self.blocks) < 0:
            raise ValueError(f"blocks must be block indices >= 0, got {self.blocks}")
        return self


class MLPBroadcastAt(Checked):
    """Broadcast the MLP output of the chosen blocks as VideoSys does: at a call whose timestep is
    one of `timesteps` the MLP computes and its output is kept; the next `skip` calls reuse it. A
    listed timestep the schedule never reaches (within half a timestep) does nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    timesteps: tuple[float, ...] = Field(min_length=1, description="0-1000 timestep scale.")
    skip: int = Field(default=2, ge=1, description="Calls that reuse the output kept at a listed timestep.")
    blocks: tuple[int, ...] = Field(min_length=1, description="Indices into the adapter's block order.")

    @model_validator(mode="after")
    def _valid(self) -> MLPBroadcastAt:
        if min(self.blocks) < 0:
            raise ValueError(f"blocks must be block indices >= 0, got {self.blocks}")
        if not all(0 <= t <= 1000 for t in self.timesteps):
            raise ValueError(f"timesteps must lie on the 0-1000 training scale, got {self.timesteps}")
        return self


def _mlp_kind(value: Any) -> str | None:
    """Which MLP rule a value describes: listed timesteps, else every N-th call."""
    if value is None or value is False:
        return str(value)
    if isinstance(value, MLPBroadcastAt) or (isinstance(value, dict) and "timesteps" in value):
        return "MLPBroadcastAt"
    return "MLPBroadcast" if isinstance(value, (dict, MLPBroadcast)) else None


class PABConfig(StrategyConfig):
    """Pyramid Attention Broadcast (arXiv 2408.12588): per attention kind, reuse each attention
    module's output between recomputations, inside a timestep window; each CFG branch keeps its
    own outputs. Kinds left unset take the model family's published default."""

    strategy: Literal["pab"] = "pab"
    spatial: Broadcast | None = None
    temporal: Broadcast | None = None
    cross: Broadcast | None = None
    mlp: Annotated[
        Annotated[MLPBroadcast, Tag("MLPBroadcast")]
        | Annotated[MLPBroadcastAt, Tag("MLPBroadcastAt")]
        | Annotated[Literal[False], Tag("False")]
        | Annotated[None, Tag("None")],
        Discriminator(
            _mlp_kind,
            custom_error_type="mlp_rule",
            custom_error_message="expected an MLPBroadcast (range, blocks, window), an MLPBroadcastAt (timesteps, "
            "blocks, skip), False (off) or nothing (the family's default)",
        ),
    ] = Field(
        default=None,
        description="MLP broadcast: every N-th call inside a window (MLPBroadcast), or from listed timesteps "
        "(MLPBroadcastAt, VideoSys's rule). Unset: the family's published default (on for Open-Sora, Open-Sora-Plan "
        "v1.1 and Latte, off elsewhere); False: off.",
    )
    reuse: Literal["output", "gated"] | None = Field(
        default=None,
        description="What a skipped module gives its block: its last output, which the block gates with the "
        "current step's gate ('output', as diffusers and VideoSys's CogVideoX), or the last gated output, what the "
        "block added then ('gated', as VideoSys's Open-Sora, Latte and Open-Sora-Plan v1.1; where the adapter "
        "declares the gates). Unset: the family's published choice.",
    )


_Kinds = dict[Literal["spatial", "temporal", "cross"], Broadcast]


def _kinds(spatial: int, temporal: int, cross: int, window: tuple[float, float]) -> _Kinds:
    return {
        "spatial": Broadcast(range=spatial, window=window),
        "temporal": Broadcast(range=temporal, window=window),
        "cross": Broadcast(range=cross, window=window),
    }


#: Published defaults by model family (adapter name); any other family gets FALLBACK.
PAB_DEFAULTS: dict[str, _Kinds] = {
    "open_sora": _kinds(2, 4, 6, (450, 930)),
    "open_sora_plan": _kinds(2, 4, 6, (100, 850)),  # v1.1
    "open_sora_plan_v1_2": {
        "spatial": Broadcast(range=2, window=(100, 850)),
        "cross": Broadcast(range=6, window=(100, 850)),
    },
    "latte": _kinds(2, 3, 6, (100, 800)),
    "cogvideox": {"spatial": Broadcast(range=2, window=(100, 850))},
    "vchitect": _kinds(2, 4, 6, (100, 800)),
}
PAB_FALLBACK: _Kinds = _kinds(2, 3, 6, (100, 800))


def _first_blocks(count: int) -> tuple[int, ...]:
    """VideoSys's blocks 0..count-1 of both the spatial and the temporal list, in the adapter's
    block order, where the two lists alternate."""
    return tuple(range(2 * count))


#: Families whose published PAB broadcasts MLP outputs, from these timesteps, two calls each.
PAB_MLP_DEFAULTS: dict[str, MLPBroadcastAt] = {
    "open_sora": MLPBroadcastAt(timesteps=(676, 788, 864), blocks=_first_blocks(5)),
    "open_sora_plan": MLPBroadcastAt(timesteps=tuple(range(738, 425, -24)), blocks=_first_blocks(7)),  # v1.1
    "latte": MLPBroadcastAt(timesteps=(720, 640, 560, 480, 400), blocks=_first_blocks(5)),
}
#: Families whose published PAB reuses the gated outputs; the others reuse the module output.
PAB_GATED: frozenset[str] = frozenset({"open_sora", "open_sora_plan", "latte"})
