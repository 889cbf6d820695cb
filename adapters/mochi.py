"""Mochi 1 (`MochiTransformer3DModel`): asymmetric dual-stream blocks with joint attention over
video and text tokens.

Mochi pipelines pass 1000 - t (the model runs from 0 at pure noise to 1000), mapped back here.
"""

from __future__ import annotations

import torch

from cachekit.declarative import Example, declare_adapter, registering
from cachekit.schemas.adapter import (
    ENCODER,
    FULL_3D,
    HIDDEN,
    JOINT_TEXT,
    TEMB,
    AdapterSpec,
    Argument,
    BlockListSpec,
    NormProbe,
    OutputSpec,
    TimestepSpec,
)

MOCHI_SPEC = AdapterSpec(
    name="mochi",
    timestep=TimestepSpec(argument=Argument(name="timestep", position=2), scale=-1, offset=1000, schedule="argument"),
    # time_embed returns (conditioning, caption projection).
    timestep_embedding=OutputSpec(module="time_embed", index=0),
    blocks=[
        BlockListSpec(
            path="transformer_blocks",
            streams=[HIDDEN, ENCODER],
            returns=[0, 1],
            attention={"attn1": "spatial"},
            mlp=["ff", "ff_context"],
        )
    ],
    probe=NormProbe(arguments={"emb": TEMB}),
    missing_attention={
        "temporal": FULL_3D,
        "cross": JOINT_TEXT,
    },
)


MochiAdapter = declare_adapter(
    MOCHI_SPEC,
    "diffusers.MochiTransformer3DModel",
    Example(
        config={
            "patch_size": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "num_layers": 2,
            "pooled_projection_dim": 16,
            "in_channels": 4,
            "qk_norm": "rms_norm",
            "text_embed_dim": 16,
            "time_embed_dim": 4,
            "activation_fn": "swiglu",
            "max_sequence_length": 16,
        },
        latents=(1, 4, 2, 8, 8),
        conditions={"encoder_hidden_states": (1, 6, 16)},
        constants={"encoder_attention_mask": torch.ones(1, 6)},
    ),
)


cachekit_register_adapters = registering(MochiAdapter)
