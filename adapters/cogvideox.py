"""CogVideoX 1.0 / 1.5 (`CogVideoXTransformer3DModel`): expert blocks with one 3D attention over
video and text tokens, which the blocks take and return separately."""

from __future__ import annotations

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
    LatentSpec,
    NormProbe,
    TimestepSpec,
)

COGVIDEOX_SPEC = AdapterSpec(
    name="cogvideox",
    timestep=TimestepSpec(argument=Argument(name="timestep", position=2), schedule="timestep"),
    # the blocks' temb: the time embedding plus, on CogVideoX1.5-5B-I2V, the ofs embedding
    timestep_embedding=TEMB,
    latent=LatentSpec(layout="BTCHW"),  # CogVideoX latents put the frames before the channels
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
        "temporal": FULL_3D,
        "cross": JOINT_TEXT,
    },
)


CogVideoXAdapter = declare_adapter(
    COGVIDEOX_SPEC,
    "diffusers.CogVideoXTransformer3DModel",
    Example(
        config={
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 4,
            "out_channels": 4,
            "time_embed_dim": 2,
            "text_embed_dim": 8,
            "num_layers": 2,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 9,
            "patch_size": 2,
            "temporal_compression_ratio": 4,
            "max_text_seq_length": 8,
        },
        latents=(1, 2, 4, 8, 8),
        conditions={"encoder_hidden_states": (1, 8, 8)},
    ),
)


cachekit_register_adapters = registering(CogVideoXAdapter)
