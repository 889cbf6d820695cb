"""How sure a study's figures are: 95% percentile-bootstrap intervals of a mean over a study's
samples (its conditions x seeds), and of the paired difference between two settings measured
on the same samples, which is what says whether one method beats another or ties it.

Resampling is seeded, so a report is the same every time it is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Bootstrap resamples per interval, and the seed that makes them repeatable.
RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    samples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 2) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL) -> Interval | None:
    """The mean of `values` with its percentile-bootstrap interval; None without finite values
    (an exact match's infinite PSNR has no mean to bound)."""
    finite = np.asarray([value for value in values if math.isfinite(value)], dtype=np.float64)
    if finite.size == 0:
        return None
    picks = np.random.default_rng(SEED).integers(0, finite.size, size=(resamples, finite.size))
    means = finite[picks].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(finite.mean()), float(low), float(high), int(finite.size))


def paired_difference(first: Mapping[Any, float], second: Mapping[Any, float]) -> Interval | None:
    """`first` minus `second` over the samples both scored (finitely), with its interval."""
    shared = [key for key in first if key in second and math.isfinite(first[key]) and math.isfinite(second[key])]
    return bootstrap([first[key] - second[key] for key in shared])
