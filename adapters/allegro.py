"""Allegro (`AllegroTransformer3DModel`): blocks with 3D self attention over all video tokens and
cross attention to the text, table-modulated like PixArt."""

from __future__ import annotations

from collections.abc import Callable

from diffusers import AllegroTransformer3DModel

from cachekit.adapter import Adapter
from cachekit.declarative import DeclarativeAdapter
from cachekit.example import ModelExample, example_of
from cachekit.hookspecs import hookimpl
from cachekit.schemas.adapter import (
    FULL_3D,
    HIDDEN,
    TEMB,
    AdapterSpec,
    Argument,
    BlockListSpec,
    OutputSpec,
    TableProbe,
    TimestepSpec,
)

ALLEGRO_SPEC = AdapterSpec(
    name="allegro",
    timestep=TimestepSpec(argument=Argument(name="timestep", position=2), schedule="timestep"),
    # adaln_single returns (projected timestep, embedded timestep); the blocks get the projection.
    timestep_embedding=OutputSpec(module="adaln_single", index=1),
    blocks=[
        BlockListSpec(
            path="transformer_blocks",
            streams=[HIDDEN],
            attention={"attn1": "spatial", "attn2": "cross"},
            mlp=["ff"],
        )
    ],
    probe=TableProbe(embedding=TEMB),
    missing_attention={"temporal": FULL_3D},
)


class AllegroAdapter(DeclarativeAdapter):
    spec = ALLEGRO_SPEC
    model_class = AllegroTransformer3DModel

    @classmethod
    def example(cls) -> ModelExample:
        def build() -> AllegroTransformer3DModel:
            return AllegroTransformer3DModel(
                num_attention_heads=2,
                attention_head_dim=12,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                cross_attention_dim=24,
                sample_width=8,
                sample_height=8,
                sample_frames=8,
                caption_channels=24,
            )

        return example_of(cls, build, (1, 4, 2, 8, 8), {"encoder_hidden_states": (1, 6, 24)})


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(AllegroAdapter)
