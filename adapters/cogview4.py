"""CogView4 (`CogView4Transformer2DModel`): joint blocks that take and return image and text
tokens separately; the adaptive norm modulates both at once."""

from __future__ import annotations

import torch

from cachekit.declarative import Example, declare_adapter, registering
from cachekit.schemas.adapter import (
    ENCODER,
    HIDDEN,
    IMAGE_ONLY,
    JOINT_TEXT,
    TEMB,
    AdapterSpec,
    Argument,
    BlockListSpec,
    NormProbe,
    OutputSpec,
    TimestepSpec,
)

COGVIEW4_SPEC = AdapterSpec(
    name="cogview4",
    timestep=TimestepSpec(argument=Argument(name="timestep", position=2), schedule="timestep"),
    timestep_embedding=OutputSpec(module="time_condition_embed"),
    blocks=[
        BlockListSpec(
            path="transformer_blocks",
            streams=[HIDDEN, ENCODER],
            returns=[0, 1],
            attention={"attn1": "spatial"},
            mlp=["ff"],
        )
    ],
    probe=NormProbe(arguments={"encoder_hidden_states": ENCODER, "temb": TEMB}),
    missing_attention={
        "temporal": IMAGE_ONLY,
        "cross": JOINT_TEXT,
    },
)


CogView4Adapter = declare_adapter(
    COGVIEW4_SPEC,
    "diffusers.CogView4Transformer2DModel",
    Example(
        config={
            "patch_size": 2,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 4,
            "out_channels": 4,
            "text_embed_dim": 8,
            "time_embed_dim": 8,
            "condition_dim": 4,
        },
        latents=(1, 4, 8, 8),
        conditions={"encoder_hidden_states": (1, 6, 8)},
        constants={
            "original_size": torch.tensor([[32, 32]]),
            "target_size": torch.tensor([[32, 32]]),
            "crop_coords": torch.tensor([[0, 0]]),
        },
    ),
)


cachekit_register_adapters = registering(CogView4Adapter)
