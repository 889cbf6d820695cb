"""PixArt-alpha and -sigma (`PixArtTransformer2DModel`): blocks with self and cross attention, modulated by a
per-block table plus the projected timestep of `adaln_single`."""

from __future__ import annotations

from collections.abc import Callable

from diffusers import PixArtTransformer2DModel

from cachekit.adapter import Adapter
from cachekit.declarative import DeclarativeAdapter
from cachekit.example import ModelExample, example_of
from cachekit.hookspecs import hookimpl
from cachekit.schemas.adapter import (
    HIDDEN,
    IMAGE_ONLY,
    AdapterSpec,
    Argument,
    BlockListSpec,
    OutputSpec,
    TableProbe,
    TimestepSpec,
)

PIXART_SPEC = AdapterSpec(
    name="pixart",
    timestep=TimestepSpec(argument=Argument(name="timestep", position=2), schedule="timestep"),
    # adaln_single returns (projected timestep, embedded timestep); the blocks get the projection.
    timestep_embedding=OutputSpec(module="adaln_single", index=1),
    blocks=[
        BlockListSpec(
            path="transformer_blocks",
            streams=[HIDDEN],
            attention={"attn1": "spatial", "attn2": "cross"},
            mlp=["ff"],
        )
    ],
    probe=TableProbe(embedding=Argument(name="timestep", position=4)),
    missing_attention={"temporal": IMAGE_ONLY},
)


class PixArtAdapter(DeclarativeAdapter):
    spec = PIXART_SPEC
    model_class = PixArtTransformer2DModel

    @classmethod
    def example(cls) -> ModelExample:
        def build() -> PixArtTransformer2DModel:
            return PixArtTransformer2DModel(
                sample_size=8,
                num_layers=2,
                patch_size=2,
                attention_head_dim=8,
                num_attention_heads=3,
                caption_channels=32,
                in_channels=4,
                cross_attention_dim=24,
                out_channels=8,
                attention_bias=True,
                activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000,
                norm_type="ada_norm_single",
                norm_elementwise_affine=False,
                norm_eps=1e-6,
            )

        no_resolution = {"resolution": None, "aspect_ratio": None}
        return example_of(
            cls, build, (1, 4, 8, 8), {"encoder_hidden_states": (1, 6, 32)}, added_cond_kwargs=no_resolution
        )


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(PixArtAdapter)
