"""The reductions policies compute their signals with, so every policy measures change alike,
and alike on every rank.

A signal may come as one tensor or as several (one per segment of the span); several count as one
tensor made of all their elements. Under context parallelism each rank holds a shard of the
tokens: while a transformer call runs in a context-parallel group, the sums behind each mean are
reduced over that group (in float64), so every rank gets the value one process would and makes the
same decision. Without a group no collective runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch

Tensors = torch.Tensor | Sequence[torch.Tensor]

#: The process group the signals of the running transformer call are reduced over (None: none).
_GROUP: ContextVar[Any] = ContextVar("cachekit_signal_group", default=None)


@contextlib.contextmanager
def reduced_over(group: Any) -> Iterator[None]:
    """Within this block, signals are sums reduced over `group` (None: computed locally)."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def current_group() -> Any:
    """The process group signals are reduced over now, or None."""
    return _GROUP.get()


def _parts(value: Tensors) -> Sequence[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else value


def _global_sums(*sums: torch.Tensor) -> list[float]:
    """The sums, each reduced over the current group (float64)."""
    stacked = torch.stack([value.double() for value in sums])
    torch.distributed.all_reduce(stacked, group=_GROUP.get())
    return stacked.tolist()


def mean_abs(value: Tensors) -> float:
    """mean |value| over every element."""
    parts = _parts(value)
    if _GROUP.get() is not None:
        total, count = _global_sums(
            torch.stack([part.abs().double().sum() for part in parts]).sum(),
            torch.tensor(float(sum(part.numel() for part in parts))),
        )
        return total / count
    if len(parts) == 1:
        return parts[0].abs().mean().item()
    return (torch.stack([part.abs().sum() for part in parts]).sum() / sum(part.numel() for part in parts)).item()


def relative_l1(current: Tensors, previous: Tensors, eps: float = 0.0) -> float:
    """mean |current - previous| / (mean |previous| + eps): how much a signal changed."""
    now, before = _parts(current), _parts(previous)
    if len(now) != len(before):
        raise ValueError(f"a signal of {len(now)} tensors cannot be compared with one of {len(before)}")
    if _GROUP.get() is not None:
        change, scale, count = _global_sums(
            torch.stack([(a.double() - b.double()).abs().sum() for a, b in zip(now, before, strict=True)]).sum(),
            torch.stack([b.double().abs().sum() for b in before]).sum(),
            torch.tensor(float(sum(b.numel() for b in before))),
        )
        return (change / count) / (scale / count + eps)
    if len(now) == 1:
        change_mean, scale_mean = (now[0] - before[0]).abs().mean(), before[0].abs().mean()
    else:
        count = sum(b.numel() for b in before)
        change_mean = torch.stack([(a - b).abs().sum() for a, b in zip(now, before, strict=True)]).sum() / count
        scale_mean = torch.stack([b.abs().sum() for b in before]).sum() / count
    return (change_mean / (scale_mean + eps)).item()
