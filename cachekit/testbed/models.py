"""The testbed's models: stock diffusers transformers in small configs, conditioned on a digit
class through their own inputs (a learned table stands in for the text encoder).

Each model predicts the flow-matching velocity (noise - data) at noise level sigma, so training,
sampling with `FlowMatchEulerDiscreteScheduler` and caching all see the stock forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel
from torch import nn

from cachekit.testbed.data import FRAMES, SIZE

CLASSES = 10
NULL_CLASS = CLASSES  # the unconditional label, dropped in during training for CFG
TEXT_TOKENS = 4
WIDTH = 64


class ClassConditioning(nn.Module):
    """A learned stand-in for the text encoder: per class, a few "text" tokens and a pooled vector."""

    def __init__(self, pooled: bool) -> None:
        super().__init__()
        self.tokens = nn.Embedding(CLASSES + 1, TEXT_TOKENS * WIDTH)
        self.pooled = nn.Embedding(CLASSES + 1, WIDTH) if pooled else None

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.tokens(labels).view(-1, TEXT_TOKENS, WIDTH)
        return tokens, self.pooled(labels) if self.pooled is not None else None


def flux_digits() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # 2x2 pixels packed per token: 16x16 -> 64 tokens
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=16,
        num_attention_heads=WIDTH // 16,
        joint_attention_dim=WIDTH,
        pooled_projection_dim=WIDTH,
        axes_dims_rope=(4, 6, 6),
    )


def wan_digits() -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=WIDTH // 16,
        attention_head_dim=16,
        in_channels=1,
        out_channels=1,
        text_dim=WIDTH,
        freq_dim=64,
        ffn_dim=4 * WIDTH,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, 16, 16) -> (B, 64, 4): 2x2 patches as tokens, as Flux pipelines pack latents."""
    b = x.shape[0]
    return x.view(b, 1, SIZE // 2, 2, SIZE // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (SIZE // 2) ** 2, 4)


def _unpack(tokens: torch.Tensor) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.view(b, SIZE // 2, SIZE // 2, 1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 1, SIZE, SIZE)


def _flux_ids() -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.meshgrid(torch.arange(SIZE // 2), torch.arange(SIZE // 2), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).view(-1, 3).float()
    return image_ids, torch.zeros(TEXT_TOKENS, 3)


def flux_velocity(
    model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor | None
) -> torch.Tensor:
    image_ids, text_ids = _flux_ids()
    out = model(
        hidden_states=_pack(x),
        encoder_hidden_states=tokens,
        pooled_projections=pooled,
        timestep=sigma,  # Flux takes sigma in [0, 1] and scales it by 1000 itself
        img_ids=image_ids,
        txt_ids=text_ids,
        return_dict=False,
    )[0]
    return _unpack(out)


def wan_velocity(
    model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor | None
) -> torch.Tensor:
    return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=tokens, return_dict=False)[0]


Velocity = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Spec:
    """One testbed model: how to build it, what it generates, how it is trained."""

    name: str
    kind: Literal["image", "video"]
    build: Callable[[], nn.Module]
    velocity: Velocity
    pooled: bool
    sample_shape: tuple[int, ...]  # one sample, without the batch dimension
    train_steps: int
    batch_size: int
    learning_rate: float = 1e-3


SPECS = {
    "flux-digits": Spec("flux-digits", "image", flux_digits, flux_velocity, True, (1, SIZE, SIZE), 3000, 32),
    "wan-moving-digits": Spec(
        "wan-moving-digits", "video", wan_digits, wan_velocity, False, (1, FRAMES, SIZE, SIZE), 12000, 16
    ),
}
