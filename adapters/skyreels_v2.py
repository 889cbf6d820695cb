"""SkyReels-V2 (`SkyReelsV2Transformer3DModel`): Wan's block structure; with diffusion forcing
each frame has its own timestep, so the modulation (and the probe) is per token."""

from __future__ import annotations

from collections.abc import Callable

from diffusers import SkyReelsV2Transformer3DModel

from cachekit.adapter import Adapter
from cachekit.adapters.wan import WAN_BLOCKS
from cachekit.declarative import DeclarativeAdapter
from cachekit.example import ModelExample, example_of
from cachekit.hookspecs import hookimpl
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


class SkyReelsV2Adapter(DeclarativeAdapter):
    spec = SKYREELS_V2_SPEC
    model_class = SkyReelsV2Transformer3DModel

    @classmethod
    def example(cls) -> ModelExample:
        from cachekit.testing import TINY_WAN_CONFIG

        def build() -> SkyReelsV2Transformer3DModel:
            return SkyReelsV2Transformer3DModel(**TINY_WAN_CONFIG, num_layers=2)

        return example_of(cls, build, (1, 4, 2, 8, 8), {"encoder_hidden_states": (1, 8, 16)})


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(SkyReelsV2Adapter)
