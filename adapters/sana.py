"""Sana (`SanaTransformer2DModel`): linear self-attention and cross attention per block,
table-modulated like PixArt."""

from __future__ import annotations

from cachekit.declarative import Example, declare_adapter, registering
from cachekit.schemas.adapter import (
    IMAGE_ONLY,
    SELF_CROSS_BLOCKS,
    AdapterSpec,
    Argument,
    OutputSpec,
    TableProbe,
    TimestepSpec,
)

SANA_SPEC = AdapterSpec(
    name="sana",
    timestep=TimestepSpec(argument=Argument(name="timestep", position=2), schedule="timestep"),
    # time_embed returns (projected timestep, embedded timestep); the blocks get the projection.
    timestep_embedding=OutputSpec(module="time_embed", index=1),
    blocks=[SELF_CROSS_BLOCKS],
    probe=TableProbe(embedding=Argument(name="timestep", position=4)),
    missing_attention={"temporal": IMAGE_ONLY},
)


SanaAdapter = declare_adapter(
    SANA_SPEC,
    "diffusers.SanaTransformer2DModel",
    Example(
        config={
            "patch_size": 1,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "num_cross_attention_heads": 2,
            "cross_attention_head_dim": 4,
            "cross_attention_dim": 8,
            "caption_channels": 8,
            "sample_size": 32,
        },
        latents=(1, 4, 8, 8),
        conditions={"encoder_hidden_states": (1, 6, 8)},
    ),
)


cachekit_register_adapters = registering(SanaAdapter)
