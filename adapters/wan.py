"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): one list of blocks with self and cross attention.

The blocks carry only the video tokens (the text context enters each block unchanged); the probe
is block 0's table modulation of the projected timestep, per sample or (Wan 2.2 TI2V) per token.
"""

from __future__ import annotations

from typing import Any

from cachekit.declarative import Example, declare_adapter, registering
from cachekit.schemas.adapter import FULL_3D, AdapterSpec, Argument, BlockListSpec, OutputSpec, TableProbe, TimestepSpec

# (hidden_states, encoder_hidden_states, temb, rotary_emb) -> hidden_states
WAN_BLOCKS = BlockListSpec(
    path="blocks",
    streams=[Argument(name="hidden_states", position=0)],
    attention={"attn1": "spatial", "attn2": "cross"},
    mlp=["ffn"],
)
WAN_SPEC = AdapterSpec(
    name="wan",
    timestep=TimestepSpec(schedule="timestep"),
    # condition_embedder returns (temb, timestep_proj, text, image); temb is the embedding,
    # timestep_proj its projection into the blocks' modulation (TeaCache's "ret steps" probe).
    timestep_embedding=OutputSpec(module="condition_embedder", index=0),
    projected_timestep_embedding=OutputSpec(module="condition_embedder", index=1),
    blocks=[WAN_BLOCKS],
    probe=TableProbe(embedding=Argument(name="temb", position=2), float32=True),
    missing_attention={"temporal": FULL_3D},
)


#: Wan's blocks at toy size (SkyReels-V2 shares them; `cachekit.testing.tiny_wan_transformer`).
TINY_WAN: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 256,
    "ffn_dim": 32,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
    "num_layers": 2,
}

WanAdapter = declare_adapter(
    WAN_SPEC,
    "diffusers.WanTransformer3DModel",
    Example(
        config=TINY_WAN,
        latents=(1, 4, 2, 8, 8),
        conditions={"encoder_hidden_states": (1, 8, 16)},
    ),
)


cachekit_register_adapters = registering(WanAdapter)
