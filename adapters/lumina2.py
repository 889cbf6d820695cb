"""Lumina-Image 2.0 (`Lumina2Transformer2DModel`): refiner blocks for the image and the caption
tokens separately, then `layers` over both joined. The span is `layers`, the bulk of the work;
the refiners always run.

Lumina2 pipelines pass 1 - t/1000 (it runs from 0 at pure noise to 1), mapped back here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import Lumina2Transformer2DModel

from cachekit.adapter import Adapter
from cachekit.declarative import DeclarativeAdapter
from cachekit.example import ModelExample, example_of
from cachekit.hookspecs import hookimpl
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


class Lumina2Adapter(DeclarativeAdapter):
    spec = LUMINA2_SPEC
    model_class = Lumina2Transformer2DModel

    @classmethod
    def example(cls) -> ModelExample:
        def build() -> Lumina2Transformer2DModel:
            return Lumina2Transformer2DModel(
                sample_size=4,
                patch_size=2,
                in_channels=4,
                hidden_size=24,
                num_layers=2,
                num_refiner_layers=1,
                num_attention_heads=3,
                num_kv_heads=1,
                multiple_of=16,
                axes_dim_rope=(4, 2, 2),
                axes_lens=(128, 128, 128),
                cap_feat_dim=8,
            )

        mask = torch.ones(1, 6, dtype=torch.bool)
        return example_of(cls, build, (1, 4, 8, 8), {"encoder_hidden_states": (1, 6, 8)}, encoder_attention_mask=mask)


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(Lumina2Adapter)
