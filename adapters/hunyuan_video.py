"""HunyuanVideo (`HunyuanVideoTransformer3DModel`): dual-stream blocks, then single-stream blocks;
both take and return the video and text tokens separately, so one residual per stream covers
all of them. Attention runs over all video and text tokens at once."""

from __future__ import annotations

from typing import Any

import torch

from cachekit.adapter import LazyClass
from cachekit.declarative import DeclarativeAdapter, Example, registering
from cachekit.schemas.adapter import (
    ENCODER,
    FULL_3D,
    HIDDEN,
    JOINT_TEXT,
    TEMB,
    AdapterSpec,
    BlockListSpec,
    NormProbe,
    OutputSpec,
    TimestepSpec,
)

HUNYUAN_VIDEO_SPEC = AdapterSpec(
    name="hunyuan_video",
    timestep=TimestepSpec(schedule="timestep"),
    # time_text_embed returns (conditioning, token-replace embedding).
    timestep_embedding=OutputSpec(module="time_text_embed", index=0),
    blocks=[
        BlockListSpec(
            path="transformer_blocks",
            streams=[HIDDEN, ENCODER],
            returns=[0, 1],
            attention={"attn": "spatial"},
            mlp=["ff", "ff_context"],
        ),
        BlockListSpec(
            path="single_transformer_blocks",
            streams=[HIDDEN, ENCODER],
            returns=[0, 1],
            attention={"attn": "spatial"},
            mlp=["proj_mlp"],
        ),
    ],
    probe=NormProbe(arguments={"emb": TEMB}),
    missing_attention={
        "temporal": FULL_3D,
        "cross": JOINT_TEXT,
    },
)


class HunyuanVideoAdapter(DeclarativeAdapter):
    spec = HUNYUAN_VIDEO_SPEC
    model_class = LazyClass("diffusers.HunyuanVideoTransformer3DModel")
    example_model = Example(
        config={
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 10,
            "num_layers": 1,
            "num_single_layers": 2,
            "num_refiner_layers": 1,
            "patch_size": 1,
            "patch_size_t": 1,
            "guidance_embeds": True,
            "text_embed_dim": 16,
            "pooled_projection_dim": 8,
            "rope_axes_dim": (2, 4, 4),
        },
        latents=(1, 4, 2, 4, 4),
        conditions={"encoder_hidden_states": (1, 6, 16), "pooled_projections": (1, 8)},
        constants={"encoder_attention_mask": torch.ones(1, 6), "guidance": torch.tensor([3000.0])},
    )

    model: Any  # an instance of `model_class`, imported when first used

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        # The image-to-video "token replace" variant modulates the first frame apart.
        condition = getattr(getattr(model, "config", None), "image_condition_type", None)
        return super().matches(model) and condition != "token_replace"


cachekit_register_adapters = registering(HunyuanVideoAdapter)
