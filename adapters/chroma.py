"""Chroma (`ChromaTransformer2DModel`): Flux's structure with the modulation of every block
coming from one distilled approximator, and single-stream blocks that take the text and image
tokens joined (so they cache a residual of their own)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cachekit.adapter import LazyClass, call_arg
from cachekit.adapters.flux import FLUX_DOUBLE_BLOCKS
from cachekit.declarative import DeclarativeAdapter, Example, image_ids, registering
from cachekit.schemas.adapter import (
    HIDDEN,
    IMAGE_ONLY,
    JOINT_TEXT,
    TEMB,
    AdapterSpec,
    Argument,
    BlockListSpec,
    LatentSpec,
    OutputSpec,
    TimestepSpec,
)

CHROMA_SPEC = AdapterSpec(
    name="chroma",
    # Chroma pipelines pass t / 1000.
    timestep=TimestepSpec(argument=Argument(name="timestep", position=2), scale=1000, schedule="timestep"),
    timestep_embedding=OutputSpec(module="distilled_guidance_layer"),
    latent=LatentSpec(layout="BNC", ids=Argument(name="img_ids", position=3)),
    blocks=[
        FLUX_DOUBLE_BLOCKS,
        BlockListSpec(
            path="single_transformer_blocks",
            streams=[HIDDEN],
            residual="list",
            attention={"attn": "spatial"},
            mlp=["proj_mlp"],
        ),
    ],
    missing_attention={
        "temporal": IMAGE_ONLY,
        "cross": JOINT_TEXT,
    },
)


class ChromaAdapter(DeclarativeAdapter):
    spec = CHROMA_SPEC
    model_class = LazyClass("diffusers.ChromaTransformer2DModel")
    example_model = Example(
        config={
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 1,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "axes_dims_rope": [4, 4, 8],
            "approximator_hidden_dim": 32,
            "approximator_layers": 1,
            "approximator_num_channels": 16,
        },
        latents=(1, 16, 4),
        conditions={"encoder_hidden_states": (1, 6, 32)},
        constants={"img_ids": image_ids(4, 4), "txt_ids": torch.zeros(6, 3)},
    )

    model: Any  # an instance of `model_class`, imported when first used

    def probe(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        first = self.model.transformer_blocks[0]
        hidden_states = call_arg(args, kwargs, HIDDEN.position, HIDDEN.name)
        temb = call_arg(args, kwargs, TEMB.position, TEMB.name)
        return first.norm1(hidden_states, emb=temb[:, :6])[0]  # rows 0-5 modulate the image tokens


cachekit_register_adapters = registering(ChromaAdapter)
