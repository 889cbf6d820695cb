"""What the estimator keeps, per branch and site: recorded, estimated and checked.

The bytes a site will hold are known from its first value (the value's size times the tensors the
estimator keeps of it), so after the first value of a generation cachekit knows what the strategy
will keep and compares it with `max_kept_bytes` and with the device's free memory, before the
device runs out. A reuse is made only from a value recorded for inputs shaped as the call's (a
batch or token count that changed inside a generation computes instead of broadcasting), and every
estimate is checked against what was recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cachekit.errors import KeptMemoryError
from cachekit.estimator import Estimator, Kept
from cachekit.runtime.branching import SKIPPED
from cachekit.runtime.framing import Call, Frames, Key

#: How much the kept bytes may grow past the last comparison with free memory before the next one.
RECHECK_GROWTH = 1.05


class Memory:
    def __init__(
        self,
        frames: Frames,
        estimator: Estimator[Any],
        sites: int,
        where: str,
        limit: int | None = None,
        storage: torch.dtype | None = None,
    ) -> None:
        self.frames = frames
        self.estimator = estimator
        self.sites = sites  # how many sites each branch keeps a value for
        self.where = where  # what those sites are, for the error
        self.limit = limit
        self.storage = storage
        self._checked_free = 0  # the projection last compared with free memory

    def record(self, call: Call, key: Key, value: Any, inputs: Sequence[Any] = ()) -> None:
        """A computed value into the branch's estimator state for `key`, made from `inputs` (not where
        the strategy reuses only on calls that run alone and this is the produced branch's value)."""
        alone_only = self.frames.branching is not None and self.frames.strategy.reuses_alone_only
        if alone_only and call.step.branch != 0:
            return
        for part, part_value, part_inputs in _parts(call, key, value, inputs):
            if alone_only and part[-1] == SKIPPED and call.halves:
                continue
            kept = call.branch.kept.get(part)
            if kept is None:
                kept = call.branch.kept[part] = Kept(self.estimator, self.storage)
            grown = kept.record(part_value, call.step, _shapes(part_inputs))
            if grown:
                call.branch.stats.keep(grown)
                self._check(call)

    def must_compute(self, call: Call, key: Key, what: str, inputs: Sequence[Any] = ()) -> bool:
        """Whether a call the strategy would reuse must compute: nothing was kept for `key` yet, or
        it was kept for inputs of other shapes (the batch or the tokens changed)."""
        for part, _, part_inputs in _parts(call, key, None, inputs):
            kept = call.branch.kept.get(part)
            if kept is None:
                return self.frames.compute_first(what, call.step)
            if kept.inputs != _shapes(part_inputs):
                return True
        return False

    def estimate(self, call: Call, key: Key) -> Any:
        estimates = [call.branch.kept[part].estimate(call.step) for part, _, _ in _parts(call, key, None, ())]
        return estimates[0] if len(estimates) == 1 else _joined(*estimates)

    def kept_by_the_branch_level(self, call: Call, grown: int) -> None:
        """The branch level's difference grew by `grown` bytes: counted, and checked as the rest."""
        self.frames.stats.last.difference_bytes += grown
        self._check(call)

    def projected(self) -> tuple[int, int]:
        """(bytes every branch seen so far will keep, plus the branch level's difference; branches)."""
        branches = self.frames.branches()
        branching = self.frames.branching
        total = 0 if branching is None else branching.kept_bytes()
        for branch in branches:
            kept = len(branch.kept)
            if kept:
                total += branch.stats.kept_bytes * max(self.sites, kept) // kept
        return total, len(branches)

    def _check(self, call: Call) -> None:
        total, branches = self.projected()
        if self.limit is not None and total > self.limit:
            raise KeptMemoryError(self._message(total, branches, f"above max_kept_bytes ({_size(self.limit)})"))
        device = call.device
        if device is None or device.type != "cuda" or total <= self._checked_free * RECHECK_GROWTH:
            return
        self._checked_free = total
        free, _ = torch.cuda.mem_get_info(device)
        held = sum(branch.stats.kept_bytes for branch in self.frames.branches())
        slots = self.estimator.slots() or 1
        if total - held // slots > free:  # what is kept now holds one value per site
            raise KeptMemoryError(self._message(total, branches, f"more than the {_size(free)} free on {device}"))

    def _message(self, total: int, branches: int, limit: str) -> str:
        strategy = self.frames.strategy
        return (
            f"strategy {strategy.name()!r} with the {self.estimator.name()!r} estimator would keep {_size(total)} "
            f"({_size(total // max(branches, 1))} per CFG branch x {branches}, at {self.sites} {self.where}), "
            f"{limit}. Keep less: the span level (one residual per branch instead of one output per module), "
            "fewer sites, or a storage dtype (estimator dtype='bfloat16'); max_kept_bytes sets the limit"
        )


def _parts(call: Call, key: Key, value: Any, inputs: Sequence[Any]) -> list[tuple[Key, Any, Sequence[Any]]]:
    """Where `value` (made from `inputs`) is kept: whole under `key`; under the batched branch level,
    per batch half, a call of both halves split in two."""
    if not call.halves:
        return [(key, value, inputs)]
    if len(call.halves) == 1:
        return [((*key, call.halves[0]), value, inputs)]
    return [((*key, half), _half(value, half), [_half(item, half) for item in inputs]) for half in call.halves]


def _half(value: Any, half: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value.chunk(2)[half]
    if isinstance(value, tuple | list):
        return type(value)(_half(item, half) for item in value)
    return value


def _joined(first: Any, second: Any) -> Any:
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, tuple | list):
        return type(first)(_joined(a, b) for a, b in zip(first, second, strict=True))
    return first


def _shapes(inputs: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(getattr(value, "shape", None) for value in inputs)


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"
