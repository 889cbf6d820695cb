"""A small video DiT written outside diffusers, as a user's own model would be: spatial blocks
(over each frame's tokens, with cross attention to the text) alternate with temporal blocks (over
each token's frames), the model re-laying the tokens between them; blocks are modulated by a
table plus the projected timestep."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (
            proj(t).unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for proj, t in [(self.to_q, x), (self.to_k, context), (self.to_v, context)]
        )
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, cross: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim)
        self.cross = Attention(dim) if cross else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.modulation = nn.Parameter(torch.randn(6, dim) / math.sqrt(dim))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale, gate, shift2, scale2, gate2 = (
            (self.modulation + temb.unflatten(-1, (6, -1))).unsqueeze(2).unbind(1)
        )
        x = x + gate * self.attn(self.norm1(x) * (1 + scale) + shift)
        if self.cross is not None:
            x = x + self.cross(x, context)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class TinyVideoDiT(nn.Module):
    def __init__(self, channels: int = 4, dim: int = 16, depth: int = 2, text_dim: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.patch = nn.Linear(channels, dim)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.text = nn.Linear(text_dim, dim)
        self.spatial_blocks = nn.ModuleList(Block(dim, cross=True) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(Block(dim, cross=False) for _ in range(depth))
        self.out = nn.Linear(dim, channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict: bool = True):
        batch, frames, tokens, _ = hidden_states.shape
        half = torch.exp(-math.log(10000) * torch.arange(self.dim // 2) / (self.dim // 2))
        angles = timestep[:, None].float() * half
        frequencies = torch.cat([angles.sin(), angles.cos()], dim=-1).to(hidden_states.dtype)  # computed in float32
        temb = self.time_proj(self.time_embed(frequencies))
        context = self.text(encoder_hidden_states).repeat_interleave(frames, dim=0)
        x = self.patch(hidden_states).flatten(0, 1)  # batch * frames, tokens, dim
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            x = spatial(x, temb.repeat_interleave(frames, dim=0), context)
            x = x.unflatten(0, (batch, frames)).transpose(1, 2).flatten(0, 1)  # batch * tokens, frames, dim
            x = temporal(x, temb.repeat_interleave(tokens, dim=0))
            x = x.unflatten(0, (batch, tokens)).transpose(1, 2).flatten(0, 1)
        output = self.out(x).unflatten(0, (batch, frames))
        return (output,) if not return_dict else {"sample": output}
