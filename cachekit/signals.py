"""The reductions policies compute their signals with, so every policy measures change alike.

A signal may come as one tensor or as several (one per segment of the span); several count as one
tensor made of all their elements.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensors = torch.Tensor | Sequence[torch.Tensor]


def _parts(value: Tensors) -> Sequence[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else value


def mean_abs(value: Tensors) -> float:
    """mean |value| over every element."""
    parts = _parts(value)
    if len(parts) == 1:
        return parts[0].abs().mean().item()
    return (torch.stack([part.abs().sum() for part in parts]).sum() / sum(part.numel() for part in parts)).item()


def relative_l1(current: Tensors, previous: Tensors, eps: float = 0.0) -> float:
    """mean |current - previous| / (mean |previous| + eps): how much a signal changed."""
    now, before = _parts(current), _parts(previous)
    if len(now) != len(before):
        raise ValueError(f"a signal of {len(now)} tensors cannot be compared with one of {len(before)}")
    if len(now) == 1:
        change, scale = (now[0] - before[0]).abs().mean(), before[0].abs().mean()
    else:
        count = sum(b.numel() for b in before)
        change = torch.stack([(a - b).abs().sum() for a, b in zip(now, before, strict=True)]).sum() / count
        scale = torch.stack([b.abs().sum() for b in before]).sum() / count
    return (change / (scale + eps)).item()
