"""Sana (`SanaTransformer2DModel`): linear self-attention and cross attention per block,
table-modulated like PixArt."""

from __future__ import annotations

from collections.abc import Callable

from diffusers import SanaTransformer2DModel

from cachekit.adapter import Adapter
from cachekit.declarative import DeclarativeAdapter
from cachekit.example import ModelExample, example_of
from cachekit.hookspecs import hookimpl
from cachekit.schemas.adapter import (
    HIDDEN,
    IMAGE_ONLY,
    AdapterSpec,
    Argument,
    BlockListSpec,
    OutputSpec,
    TableProbe,
    TimestepSpec,
)

SANA_SPEC = AdapterSpec(
    name="sana",
    timestep=TimestepSpec(argument=Argument(name="timestep", position=2), schedule="timestep"),
    # time_embed returns (projected timestep, embedded timestep); the blocks get the projection.
    timestep_embedding=OutputSpec(module="time_embed", index=1),
    blocks=[
        BlockListSpec(
            path="transformer_blocks",
            streams=[HIDDEN],
            attention={"attn1": "spatial", "attn2": "cross"},
            mlp=["ff"],
        )
    ],
    probe=TableProbe(embedding=Argument(name="timestep", position=4)),
    missing_attention={"temporal": IMAGE_ONLY},
)


class SanaAdapter(DeclarativeAdapter):
    spec = SANA_SPEC
    model_class = SanaTransformer2DModel

    @classmethod
    def example(cls) -> ModelExample:
        def build() -> SanaTransformer2DModel:
            return SanaTransformer2DModel(
                patch_size=1,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                attention_head_dim=4,
                num_attention_heads=2,
                num_cross_attention_heads=2,
                cross_attention_head_dim=4,
                cross_attention_dim=8,
                caption_channels=8,
                sample_size=32,
            )

        return example_of(cls, build, (1, 4, 8, 8), {"encoder_hidden_states": (1, 6, 8)})


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(SanaAdapter)
