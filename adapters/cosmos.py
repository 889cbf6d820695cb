"""Cosmos (`CosmosTransformer3DModel`): blocks with 3D self attention and cross attention, each
modulated by the embedded timestep plus a low-rank per-block correction.

Cosmos pipelines pass the EDM noise conditioning (a log-sigma), which falls as denoising goes on
but is not on the 0-1000 scale: timestep windows (PAB's) need values on its own scale.
"""

from __future__ import annotations

from collections.abc import Callable

from diffusers import CosmosTransformer3DModel

from cachekit.adapter import Adapter
from cachekit.declarative import DeclarativeAdapter
from cachekit.example import ModelExample, example_of
from cachekit.hookspecs import hookimpl
from cachekit.schemas.adapter import (
    FULL_3D,
    HIDDEN,
    AdapterSpec,
    Argument,
    BlockListSpec,
    NormProbe,
    OutputSpec,
    TimestepSpec,
)

COSMOS_SPEC = AdapterSpec(
    name="cosmos",
    timestep=TimestepSpec(schedule="call"),
    # time_embed returns (temb, embedded timestep); the norms take both.
    timestep_embedding=OutputSpec(module="time_embed", index=1),
    blocks=[
        BlockListSpec(
            path="transformer_blocks",
            streams=[HIDDEN],
            attention={"attn1": "spatial", "attn2": "cross"},
            mlp=["ff"],
        )
    ],
    probe=NormProbe(
        arguments={
            "embedded_timestep": Argument(name="embedded_timestep", position=2),
            "temb": Argument(name="temb", position=3),
        }
    ),
    missing_attention={"temporal": FULL_3D},
)


class CosmosAdapter(DeclarativeAdapter):
    spec = COSMOS_SPEC
    model_class = CosmosTransformer3DModel

    @classmethod
    def example(cls) -> ModelExample:
        def build() -> CosmosTransformer3DModel:
            return CosmosTransformer3DModel(
                in_channels=4,
                out_channels=4,
                num_attention_heads=2,
                attention_head_dim=12,
                num_layers=2,
                mlp_ratio=2,
                text_embed_dim=16,
                adaln_lora_dim=4,
                max_size=(4, 32, 32),
                patch_size=(1, 2, 2),
                rope_scale=(2.0, 1.0, 1.0),
                concat_padding_mask=False,  # the padding mask path needs torchvision
                extra_pos_embed_type="learnable",
            )

        return example_of(cls, build, (1, 4, 2, 8, 8), {"encoder_hidden_states": (1, 6, 16)}, fps=30)


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(CosmosAdapter)
