"""SkyReels-V2 (`SkyReelsV2Transformer3DModel`): Wan's block structure; with diffusion forcing
each frame has its own timestep, so the modulation (and the probe) is per token."""

from __future__ import annotations

from cachekit.adapters.wan import TINY_WAN, WAN_BLOCKS
from cachekit.declarative import Example, declare_adapter, registering
from cachekit.schemas.adapter import FULL_3D, TEMB, AdapterSpec, OutputSpec, TableProbe, TimestepSpec

SKYREELS_V2_SPEC = AdapterSpec(
    name="skyreels_v2",
    timestep=TimestepSpec(schedule="timestep"),
    timestep_embedding=OutputSpec(module="condition_embedder", index=0),
    projected_timestep_embedding=OutputSpec(module="condition_embedder", index=1),
    blocks=[WAN_BLOCKS],
    probe=TableProbe(embedding=TEMB, float32=True),
    missing_attention={"temporal": FULL_3D},
)


SkyReelsV2Adapter = declare_adapter(
    SKYREELS_V2_SPEC,
    "diffusers.SkyReelsV2Transformer3DModel",
    Example(
        config=TINY_WAN,
        latents=(1, 4, 2, 8, 8),
        conditions={"encoder_hidden_states": (1, 8, 16)},
    ),
)


cachekit_register_adapters = registering(SkyReelsV2Adapter)
