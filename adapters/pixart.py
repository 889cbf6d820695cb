"""PixArt-alpha and -sigma (`PixArtTransformer2DModel`): blocks with self and cross attention, modulated by a
per-block table plus the projected timestep of `adaln_single`."""

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

PIXART_SPEC = AdapterSpec(
    name="pixart",
    timestep=TimestepSpec(argument=Argument(name="timestep", position=2), schedule="timestep"),
    # adaln_single returns (projected timestep, embedded timestep); the blocks get the projection.
    timestep_embedding=OutputSpec(module="adaln_single", index=1),
    blocks=[SELF_CROSS_BLOCKS],
    probe=TableProbe(embedding=Argument(name="timestep", position=4)),
    missing_attention={"temporal": IMAGE_ONLY},
)


PixArtAdapter = declare_adapter(
    PIXART_SPEC,
    "diffusers.PixArtTransformer2DModel",
    Example(
        config={
            "sample_size": 8,
            "num_layers": 2,
            "patch_size": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 3,
            "caption_channels": 32,
            "in_channels": 4,
            "cross_attention_dim": 24,
            "out_channels": 8,
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
        },
        latents=(1, 4, 8, 8),
        conditions={"encoder_hidden_states": (1, 6, 32)},
        constants={"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
    ),
)


cachekit_register_adapters = registering(PixArtAdapter)
