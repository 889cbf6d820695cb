"""DiT (`DiTTransformer2DModel`): class-conditional blocks, each embedding the timestep and the
class label in its own adaptive norm; block 0's embedder is the one the probe and signals use."""

from __future__ import annotations

import torch

from cachekit.declarative import Example, declare_adapter, registering
from cachekit.schemas.adapter import (
    HIDDEN,
    IMAGE_ONLY,
    AdapterSpec,
    Argument,
    BlockListSpec,
    NormProbe,
    OutputSpec,
    TimestepSpec,
)

DIT_SPEC = AdapterSpec(
    name="dit",
    timestep=TimestepSpec(schedule="timestep"),
    timestep_embedding=OutputSpec(module="transformer_blocks.0.norm1.emb"),
    blocks=[BlockListSpec(path="transformer_blocks", streams=[HIDDEN], attention={"attn1": "spatial"}, mlp=["ff"])],
    probe=NormProbe(
        arguments={
            "timestep": Argument(name="timestep", position=4),
            "class_labels": Argument(name="class_labels", position=6),
        },
        dtype_argument="hidden_dtype",
    ),
    missing_attention={
        "temporal": IMAGE_ONLY,
        "cross": "class-conditional: the label enters through the adaptive norms, there is no cross attention",
    },
)


DiTAdapter = declare_adapter(
    DIT_SPEC,
    "diffusers.DiTTransformer2DModel",
    Example(
        config={
            "sample_size": 8,
            "num_layers": 2,
            "patch_size": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "in_channels": 4,
            "out_channels": 8,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False,
        },
        latents=(1, 4, 8, 8),
        branch_values={"class_labels": (torch.tensor([3]), torch.tensor([1000]))},
    ),
)


cachekit_register_adapters = registering(DiTAdapter)
