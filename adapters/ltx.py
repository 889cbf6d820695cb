"""LTX-Video (`LTXVideoTransformer3DModel`): blocks with self attention over all video tokens and
cross attention to the text, modulated per token by a table plus the projected timestep."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import LTXVideoTransformer3DModel

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
    LatentSpec,
    OutputSpec,
    TableProbe,
    TimestepSpec,
)

LTX_SPEC = AdapterSpec(
    name="ltx",
    timestep=TimestepSpec(argument=Argument(name="timestep", position=2), schedule="timestep"),
    # time_embed returns (projected timestep, embedded timestep); the blocks get the projection.
    timestep_embedding=OutputSpec(module="time_embed", index=1),
    # packed tokens in (frame, row, column) raster order
    latent=LatentSpec(
        layout="BNC",
        grid=[
            Argument(name="num_frames", position=4),
            Argument(name="height", position=5),
            Argument(name="width", position=6),
        ],
    ),
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


class LTXAdapter(DeclarativeAdapter):
    spec = LTX_SPEC
    model_class = LTXVideoTransformer3DModel

    @classmethod
    def example(cls) -> ModelExample:
        def build() -> LTXVideoTransformer3DModel:
            return LTXVideoTransformer3DModel(
                in_channels=4,
                out_channels=4,
                patch_size=1,
                patch_size_t=1,
                num_attention_heads=2,
                attention_head_dim=8,
                cross_attention_dim=16,
                num_layers=2,
                caption_channels=16,
            )

        return example_of(
            cls,
            build,
            (1, 2 * 4 * 4, 4),  # packed tokens of 2 frames of 4x4
            {"encoder_hidden_states": (1, 6, 16)},
            encoder_attention_mask=torch.ones(1, 6),
            num_frames=2,
            height=4,
            width=4,
        )


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(LTXAdapter)
