"""Flux (`FluxTransformer2DModel`): double-stream blocks, then single-stream blocks.

In diffusers both block kinds take and return the image and text streams separately, so one
residual per stream covers all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import FluxTransformer2DModel

from cachekit.adapter import Adapter
from cachekit.declarative import DeclarativeAdapter
from cachekit.example import ModelExample, example_of, image_ids
from cachekit.hookspecs import hookimpl
from cachekit.schemas.adapter import (
    ENCODER,
    HIDDEN,
    IMAGE_ONLY,
    JOINT_TEXT,
    TEMB,
    AdapterSpec,
    Argument,
    BlockListSpec,
    LatentSpec,
    NormProbe,
    OutputSpec,
    TimestepSpec,
)

# Both block kinds: (hidden_states, encoder_hidden_states, temb, ...) -> (encoder_hidden_states, hidden_states)
FLUX_SPEC = AdapterSpec(
    name="flux",
    # Flux pipelines pass t / 1000; the model multiplies it back.
    timestep=TimestepSpec(argument=Argument(name="timestep", position=3), scale=1000, schedule="timestep"),
    timestep_embedding=OutputSpec(module="time_text_embed"),
    # packed 2x2 patches, each token's (frame, row, column) in img_ids
    latent=LatentSpec(layout="BNC", ids=Argument(name="img_ids", position=4)),
    blocks=[
        BlockListSpec(
            path="transformer_blocks",
            streams=[HIDDEN, ENCODER],
            returns=[1, 0],
            attention={"attn": "spatial"},
            mlp=["ff", "ff_context"],
        ),
        # single-stream: the MLP's input projection runs beside attention
        BlockListSpec(
            path="single_transformer_blocks",
            streams=[HIDDEN, ENCODER],
            returns=[1, 0],
            attention={"attn": "spatial"},
            mlp=["proj_mlp"],
        ),
    ],
    probe=NormProbe(arguments={"emb": TEMB}),
    missing_attention={
        "temporal": IMAGE_ONLY,
        "cross": JOINT_TEXT,
    },
)


class FluxAdapter(DeclarativeAdapter):
    spec = FLUX_SPEC
    model_class = FluxTransformer2DModel

    @classmethod
    def example(cls) -> ModelExample:
        from cachekit.testing import tiny_flux_transformer

        return example_of(
            cls,
            tiny_flux_transformer,
            (1, 16, 4),  # 4x4 packed tokens
            {"encoder_hidden_states": (1, 8, 32), "pooled_projections": (1, 32)},
            img_ids=image_ids(4, 4),
            txt_ids=torch.zeros(8, 3),
        )


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(FluxAdapter)
