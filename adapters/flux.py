"""Flux (`FluxTransformer2DModel`): double-stream blocks, then single-stream blocks.

In diffusers both block kinds take and return the image and text streams separately, so one
residual per stream covers all of them.
"""

from __future__ import annotations

from typing import Any

import torch

from cachekit.declarative import Example, declare_adapter, image_ids, registering
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
#: The double-stream blocks (Chroma's too).
FLUX_DOUBLE_BLOCKS = BlockListSpec(
    path="transformer_blocks",
    streams=[HIDDEN, ENCODER],
    returns=[1, 0],
    attention={"attn": "spatial"},
    mlp=["ff", "ff_context"],
)
FLUX_SPEC = AdapterSpec(
    name="flux",
    # Flux pipelines pass t / 1000; the model multiplies it back.
    timestep=TimestepSpec(argument=Argument(name="timestep", position=3), scale=1000, schedule="timestep"),
    timestep_embedding=OutputSpec(module="time_text_embed"),
    # packed 2x2 patches, each token's (frame, row, column) in img_ids
    latent=LatentSpec(layout="BNC", ids=Argument(name="img_ids", position=4)),
    blocks=[
        FLUX_DOUBLE_BLOCKS,
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


#: Flux's blocks at toy size (`cachekit.testing.tiny_flux_transformer` builds it too).
TINY_FLUX: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 4, 8],
}

FluxAdapter = declare_adapter(
    FLUX_SPEC,
    "diffusers.FluxTransformer2DModel",
    Example(
        config=TINY_FLUX,
        latents=(1, 16, 4),
        conditions={"encoder_hidden_states": (1, 8, 32), "pooled_projections": (1, 32)},
        constants={"img_ids": image_ids(4, 4), "txt_ids": torch.zeros(8, 3)},
    ),
)


cachekit_register_adapters = registering(FluxAdapter)
