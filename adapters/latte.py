"""Latte (`LatteTransformer3DModel`): spatial blocks (over each frame's tokens, with cross
attention) and temporal blocks (over each token's frames) alternate, the model re-laying the
tokens between every two; so each block caches a residual of its own (memory: one residual per
block and branch), decided once per call."""

from __future__ import annotations

from cachekit.declarative import Example, declare_adapter, registering
from cachekit.schemas.adapter import (
    HIDDEN,
    AdapterSpec,
    Argument,
    BlockListSpec,
    Gate,
    OutputSpec,
    TableProbe,
    TimestepSpec,
)

# The blocks gate their self attention and MLP outputs by rows 2 and 5 of their table plus the
# projected timestep (VideoSys's PAB reuses those gated outputs).
TIMESTEP = Argument(name="timestep", position=4)
GATES = {"attn1": Gate(embedding=TIMESTEP, row=2), "ff": Gate(embedding=TIMESTEP, row=5)}

LATTE_SPEC = AdapterSpec(
    name="latte",
    timestep=TimestepSpec(schedule="timestep"),
    # adaln_single returns (projected timestep, embedded timestep); the blocks get the projection.
    timestep_embedding=OutputSpec(module="adaln_single", index=1),
    blocks=[
        BlockListSpec(
            path="transformer_blocks",
            streams=[HIDDEN],
            residual="block",
            attention={"attn1": "spatial", "attn2": "cross"},
            mlp=["ff"],
            gates=GATES,
        ),
        BlockListSpec(
            path="temporal_transformer_blocks",
            streams=[HIDDEN],
            residual="block",
            attention={"attn1": "temporal"},
            mlp=["ff"],
            gates=GATES,
        ),
    ],
    interleave=True,
    probe=TableProbe(embedding=TIMESTEP),
)


LatteAdapter = declare_adapter(
    LATTE_SPEC,
    "diffusers.LatteTransformer3DModel",
    Example(
        config={
            "sample_size": 8,
            "num_layers": 2,
            "patch_size": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "caption_channels": 8,
            "in_channels": 4,
            "cross_attention_dim": 16,
            "out_channels": 8,
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "video_length": 2,
        },
        latents=(1, 4, 2, 8, 8),
        conditions={"encoder_hidden_states": (1, 6, 8)},
    ),
)


cachekit_register_adapters = registering(LatteAdapter)
