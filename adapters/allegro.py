"""Allegro (`AllegroTransformer3DModel`): blocks with 3D self attention over all video tokens and
cross attention to the text, table-modulated like PixArt."""

from __future__ import annotations

from cachekit.declarative import Example, declare_adapter, registering
from cachekit.schemas.adapter import (
    FULL_3D,
    SELF_CROSS_BLOCKS,
    TEMB,
    AdapterSpec,
    Argument,
    OutputSpec,
    TableProbe,
    TimestepSpec,
)

ALLEGRO_SPEC = AdapterSpec(
    name="allegro",
    timestep=TimestepSpec(argument=Argument(name="timestep", position=2), schedule="timestep"),
    # adaln_single returns (projected timestep, embedded timestep); the blocks get the projection.
    timestep_embedding=OutputSpec(module="adaln_single", index=1),
    blocks=[SELF_CROSS_BLOCKS],
    probe=TableProbe(embedding=TEMB),
    missing_attention={"temporal": FULL_3D},
)


AllegroAdapter = declare_adapter(
    ALLEGRO_SPEC,
    "diffusers.AllegroTransformer3DModel",
    Example(
        config={
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 2,
            "cross_attention_dim": 24,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 8,
            "caption_channels": 24,
        },
        latents=(1, 4, 2, 8, 8),
        conditions={"encoder_hidden_states": (1, 6, 24)},
    ),
)


cachekit_register_adapters = registering(AllegroAdapter)
