"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): one list of blocks with self and cross attention.

The blocks carry only the video tokens (the text context enters each block unchanged); the probe
is block 0's table modulation of the projected timestep, per sample or (Wan 2.2 TI2V) per token.
"""

from __future__ import annotations

from collections.abc import Callable

from diffusers import WanTransformer3DModel

from cachekit.adapter import Adapter
from cachekit.declarative import DeclarativeAdapter
from cachekit.example import ModelExample, example_of
from cachekit.hookspecs import hookimpl
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


class WanAdapter(DeclarativeAdapter):
    spec = WAN_SPEC
    model_class = WanTransformer3DModel

    @classmethod
    def example(cls) -> ModelExample:
        from cachekit.testing import tiny_wan_transformer

        return example_of(cls, tiny_wan_transformer, (1, 4, 2, 8, 8), {"encoder_hidden_states": (1, 8, 16)})


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(WanAdapter)
