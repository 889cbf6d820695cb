"""Lumina-Image 2.0 (`Lumina2Transformer2DModel`): refiner blocks for the image and the caption
tokens separately, then `layers` over both joined. The span is `layers`, the bulk of the work;
the refiners always run.

Lumina2 pipelines pass 1 - t/1000 (it runs from 0 at pure noise to 1), mapped back here.
"""

from __future__ import annotations

import torch

from cachekit.declarative import Example, declare_adapter, registering
from cachekit.schemas.adapter import (
    HIDDEN,
    IMAGE_ONLY,
    JOINT_TEXT,
    AdapterSpec,
    Argument,
    BlockListSpec,
    NormProbe,
    OutputSpec,
    TimestepSpec,
)

LUMINA2_SPEC = AdapterSpec(
    name="lumina2",
    timestep=TimestepSpec(offset=1000, scale=-1000, schedule="timestep"),
    # time_caption_embed returns (time embedding, caption embedding).
    timestep_embedding=OutputSpec(module="time_caption_embed", index=0),
    blocks=[
        BlockListSpec(path="layers", streams=[HIDDEN], attention={"attn": "spatial"}, mlp=["feed_forward"]),
    ],
    probe=NormProbe(arguments={"emb": Argument(name="temb", position=3)}),
    missing_attention={
        "temporal": IMAGE_ONLY,
        "cross": JOINT_TEXT,
    },
)


Lumina2Adapter = declare_adapter(
    LUMINA2_SPEC,
    "diffusers.Lumina2Transformer2DModel",
    Example(
        config={
            "sample_size": 4,
            "patch_size": 2,
            "in_channels": 4,
            "hidden_size": 24,
            "num_layers": 2,
            "num_refiner_layers": 1,
            "num_attention_heads": 3,
            "num_kv_heads": 1,
            "multiple_of": 16,
            "axes_dim_rope": (4, 2, 2),
            "axes_lens": (128, 128, 128),
            "cap_feat_dim": 8,
        },
        latents=(1, 4, 8, 8),
        conditions={"encoder_hidden_states": (1, 6, 8)},
        constants={"encoder_attention_mask": torch.ones(1, 6, dtype=torch.bool)},
    ),
)


cachekit_register_adapters = registering(Lumina2Adapter)
