"""Qwen-Image (`QwenImageTransformer2DModel`): dual-stream blocks; each stream has its own
modulation MLP (`img_mod`, `txt_mod`), which the block applies with its own `_modulate`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cachekit.adapter import LazyClass, call_arg
from cachekit.declarative import DeclarativeAdapter, Example, registering
from cachekit.schemas.adapter import (
    ENCODER,
    HIDDEN,
    IMAGE_ONLY,
    JOINT_TEXT,
    AdapterSpec,
    Argument,
    BlockListSpec,
    OutputSpec,
    TimestepSpec,
)

QWENIMAGE_SPEC = AdapterSpec(
    name="qwenimage",
    # Qwen-Image pipelines pass t / 1000.
    timestep=TimestepSpec(argument=Argument(name="timestep", position=3), scale=1000, schedule="timestep"),
    timestep_embedding=OutputSpec(module="time_text_embed"),
    blocks=[
        BlockListSpec(
            path="transformer_blocks",
            streams=[HIDDEN, ENCODER],
            returns=[1, 0],
            attention={"attn": "spatial"},
            mlp=["img_mlp", "txt_mlp"],
        )
    ],
    missing_attention={
        "temporal": IMAGE_ONLY,
        "cross": JOINT_TEXT,
    },
)


class QwenImageAdapter(DeclarativeAdapter):
    spec = QWENIMAGE_SPEC
    model_class = LazyClass("diffusers.QwenImageTransformer2DModel")
    example_model = Example(
        config={
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 3,
            "joint_attention_dim": 16,
            "axes_dims_rope": (8, 4, 4),
        },
        latents=(1, 16, 16),
        conditions={"encoder_hidden_states": (1, 6, 16)},
        constants={"encoder_hidden_states_mask": torch.ones(1, 6), "img_shapes": [(1, 4, 4)]},
    )

    model: Any  # an instance of `model_class`, imported when first used

    def probe(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        first = self.model.transformer_blocks[0]
        hidden_states = call_arg(args, kwargs, 0, "hidden_states")
        temb = call_arg(args, kwargs, 3, "temb")
        shift_scale_gate = first.img_mod(temb).chunk(2, dim=-1)[0]  # the attention's; the MLP's follow
        index = kwargs.get("modulate_index", args[6] if len(args) > 6 else None)
        return first._modulate(first.img_norm1(hidden_states), shift_scale_gate, index)[0]

    def latent(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The generated image's packed tokens (those of edit images follow them) on their grid."""
        tokens = call_arg(args, kwargs, 0, "hidden_states")
        shapes = call_arg(args, kwargs, 4, "img_shapes")[0]  # per sample: (frames, h, w), or a list of them
        frames, height, width = shapes[0] if isinstance(shapes, list) else shapes
        generated = tokens[:, : frames * height * width].transpose(1, 2)
        return generated.unflatten(-1, (frames, height, width))


cachekit_register_adapters = registering(QwenImageAdapter)
