"""LTX-Video (`LTXVideoTransformer3DModel`): blocks with self attention over all video tokens and
cross attention to the text, modulated per token by a table plus the projected timestep."""

from __future__ import annotations

import torch

from cachekit.declarative import Example, declare_adapter, registering
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


LTXAdapter = declare_adapter(
    LTX_SPEC,
    "diffusers.LTXVideoTransformer3DModel",
    Example(
        config={
            "in_channels": 4,
            "out_channels": 4,
            "patch_size": 1,
            "patch_size_t": 1,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 16,
            "num_layers": 2,
            "caption_channels": 16,
        },
        latents=(1, 2 * 4 * 4, 4),
        conditions={"encoder_hidden_states": (1, 6, 16)},
        constants={"encoder_attention_mask": torch.ones(1, 6), "num_frames": 2, "height": 4, "width": 4},
    ),
)


cachekit_register_adapters = registering(LTXAdapter)
