"""Cosmos (`CosmosTransformer3DModel`): blocks with 3D self attention and cross attention, each
modulated by the embedded timestep plus a low-rank per-block correction.

Cosmos pipelines pass the EDM noise conditioning (a log-sigma), which falls as denoising goes on
but is not on the 0-1000 scale: timestep windows (PAB's) need values on its own scale.
"""

from __future__ import annotations

from cachekit.declarative import Example, declare_adapter, registering
from cachekit.schemas.adapter import (
    FULL_3D,
    SELF_CROSS_BLOCKS,
    AdapterSpec,
    Argument,
    NormProbe,
    OutputSpec,
    TimestepSpec,
)

COSMOS_SPEC = AdapterSpec(
    name="cosmos",
    timestep=TimestepSpec(schedule="call"),
    # time_embed returns (temb, embedded timestep); the norms take both.
    timestep_embedding=OutputSpec(module="time_embed", index=1),
    blocks=[SELF_CROSS_BLOCKS],
    probe=NormProbe(
        arguments={
            "embedded_timestep": Argument(name="embedded_timestep", position=2),
            "temb": Argument(name="temb", position=3),
        }
    ),
    missing_attention={"temporal": FULL_3D},
)


CosmosAdapter = declare_adapter(
    COSMOS_SPEC,
    "diffusers.CosmosTransformer3DModel",
    Example(
        config={
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "num_layers": 2,
            "mlp_ratio": 2,
            "text_embed_dim": 16,
            "adaln_lora_dim": 4,
            "max_size": (4, 32, 32),
            "patch_size": (1, 2, 2),
            "rope_scale": (2.0, 1.0, 1.0),
            "concat_padding_mask": False,
            "extra_pos_embed_type": "learnable",
        },
        latents=(1, 4, 2, 8, 8),
        conditions={"encoder_hidden_states": (1, 6, 16)},
        constants={"fps": 30},
    ),
)


cachekit_register_adapters = registering(CosmosAdapter)
