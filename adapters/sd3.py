"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): joint blocks over image and text tokens.

The last block drops the text tokens (it returns None for them), which the span carries as is.
SD3.5's dual-attention blocks have a second, image-only self-attention (`attn2`).
"""

from __future__ import annotations

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

SD3_SPEC = AdapterSpec(
    name="sd3",
    timestep=TimestepSpec(argument=Argument(name="timestep", position=3), schedule="timestep"),
    timestep_embedding=OutputSpec(module="time_text_embed"),
    blocks=[
        BlockListSpec(
            path="transformer_blocks",
            streams=[HIDDEN, ENCODER],
            returns=[1, 0],
            attention={"attn": "spatial", "attn2": "spatial"},
            mlp=["ff", "ff_context"],
        )
    ],
    probe=NormProbe(arguments={"emb": TEMB}),
    missing_attention={
        "temporal": IMAGE_ONLY,
        "cross": JOINT_TEXT,
    },
)


SD3Adapter = declare_adapter(
    SD3_SPEC,
    "diffusers.SD3Transformer2DModel",
    Example(
        config={
            "sample_size": 8,
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "caption_projection_dim": 16,
            "joint_attention_dim": 16,
            "pooled_projection_dim": 16,
            "out_channels": 4,
            "dual_attention_layers": (0,),
        },
        latents=(1, 4, 8, 8),
        conditions={"encoder_hidden_states": (1, 6, 16), "pooled_projections": (1, 16)},
    ),
)


cachekit_register_adapters = registering(SD3Adapter)
