"""The reductions strategies compute their signals with, so every strategy measures change alike,
alike on every rank, and at the cost of one host sync per decision at most.

A signal may come as one tensor or as several (one per segment of the span); several count as one
tensor made of all their elements. Sums are taken in float64 (`sum(dtype=...)`: no float64 copy of
the tensor) on the signal's own device. Under context parallelism each rank holds a shard of the
tokens: while a transformer call runs in a context-parallel group, the sums behind each mean are
reduced over that group, so every rank gets the value one process would and makes the same
decision. Without a group no collective runs.

`mean_abs` and `relative_l1` read their value back to the host (one sync each). A strategy that
combines several signals into one decision keeps them on the device (`*_on_device`) and reads the
combination once with `read`.
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


#: Whether host reads of meta tensors answer zeros (`cachekit.testing.meta_reads`, for tests of full-size shapes).
_meta_reads = [False]


def meta_reads_answered() -> bool:
    return _meta_reads[0]


def read(*values: torch.Tensor) -> list[float]:
    """Device values as Python floats: the one host sync of a decision."""
    if len(values) == 1:
        return [values[0].item()]
    return torch.stack([value.to(torch.float64) for value in values]).tolist()


def mean_abs(value: Tensors) -> float:
    """mean |value| over every element."""
    return read(mean_abs_on_device(value))[0]


def relative_l1(current: Tensors, previous: Tensors, eps: float = 0.0) -> float:
    """mean |current - previous| / (mean |previous| + eps): how much a signal changed."""
    return read(relative_l1_on_device(current, previous, eps))[0]


def mean_abs_on_device(value: Tensors) -> torch.Tensor:
    """mean |value|, a float64 scalar on the value's device, not read."""
    parts = _parts(value)
    total = _total([part.abs().sum(dtype=torch.float64) for part in parts])
    return _means(total, count=sum(part.numel() for part in parts))[0]


def relative_l1_on_device(current: Tensors, previous: Tensors, eps: float = 0.0) -> torch.Tensor:
    """`relative_l1` as a float64 scalar on the signal's device, not read."""
    now, before = _parts(current), _parts(previous)
    if len(now) != len(before):
        raise ValueError(f"a signal of {len(now)} tensors cannot be compared with one of {len(before)}")
    change = _total([(a - b).abs().sum(dtype=torch.float64) for a, b in zip(now, before, strict=True)])
    scale = _total([b.abs().sum(dtype=torch.float64) for b in before])
    change_mean, scale_mean = _means(change, scale, count=sum(b.numel() for b in before))
    return change_mean / (scale_mean + eps)


def _parts(value: Tensors) -> Sequence[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else value


def _total(sums: list[torch.Tensor]) -> torch.Tensor:
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum()


def _means(*sums: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Each sum over `count` elements as a mean; under a group, sums and counts over every rank."""
    group = _GROUP.get()
    if group is None:
        return [total / count for total in sums]
    device = sums[0].device
    stacked = torch.stack([*sums, torch.full((), count, dtype=torch.float64, device=device)])
    torch.distributed.all_reduce(stacked, group=group)
    return list(stacked[:-1] / stacked[-1])
