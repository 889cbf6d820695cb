"""HiDream-I1 (`HiDreamImageTransformer2DModel`): dual-stream blocks, then single-stream blocks
over image and text tokens joined; each block is a wrapper whose `.block` does the work.

Between blocks the model swaps in the next Llama layer's text tokens and cuts them off again;
only the image tokens leave the model, and their residual is exact per list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cachekit.adapter import LazyClass, call_arg
from cachekit.declarative import DeclarativeAdapter, Example, registering
from cachekit.schemas.adapter import (
    HIDDEN,
    IMAGE_ONLY,
    JOINT_TEXT,
    AdapterSpec,
    Argument,
    BlockListSpec,
    OutputSpec,
    TimestepSpec,
)

_TEMB = Argument(name="temb", position=3)

HIDREAM_SPEC = AdapterSpec(
    name="hidream",
    timestep=TimestepSpec(argument=Argument(name="timesteps", position=1), schedule="timestep"),
    timestep_embedding=OutputSpec(module="t_embedder"),
    blocks=[
        BlockListSpec(
            path="double_stream_blocks",
            streams=[HIDDEN, Argument(name="encoder_hidden_states", position=2)],
            returns=[0, 1],
            residual="list",
            attention={"block.attn1": "spatial"},
            mlp=["block.ff_i", "block.ff_t"],
        ),
        BlockListSpec(
            path="single_stream_blocks",
            streams=[HIDDEN],
            residual="list",
            attention={"block.attn1": "spatial"},
            mlp=["block.ff_i"],
        ),
    ],
    missing_attention={
        "temporal": IMAGE_ONLY,
        "cross": JOINT_TEXT,
    },
)


class HiDreamAdapter(DeclarativeAdapter):
    spec = HIDREAM_SPEC
    model_class = LazyClass("diffusers.HiDreamImageTransformer2DModel")
    example_model = Example(
        config={
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 1,
            "num_single_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "caption_channels": [8, 4],
            "text_emb_dim": 8,
            "num_routed_experts": 4,
            "num_activated_experts": 2,
            "axes_dims_rope": (4, 2, 2),
            "max_resolution": (32, 32),
            "llama_layers": (0, 1, 2),
        },
        latents=(1, 4, 8, 8),
        conditions={
            "encoder_hidden_states_t5": (1, 6, 8),
            "encoder_hidden_states_llama3": (3, 1, 6, 4),
            "pooled_embeds": (1, 8),
        },
    )

    model: Any  # an instance of `model_class`, imported when first used

    def probe(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        first = self.model.double_stream_blocks[0].block
        hidden_states = call_arg(args, kwargs, 0, "hidden_states")
        temb = call_arg(args, kwargs, _TEMB.position, _TEMB.name)
        shift, scale = first.adaLN_modulation(temb)[:, None].chunk(12, dim=-1)[:2]  # the image attention's
        return first.norm1_i(hidden_states).to(hidden_states.dtype) * (1 + scale) + shift


cachekit_register_adapters = registering(HiDreamAdapter)
