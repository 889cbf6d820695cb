"""Tune a policy's main knob to a target: a share of computed transformer calls, or a PSNR floor
against the uncached output, measured on held-out seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import cachekit
from cachekit.metrics.fidelity import psnr
from cachekit.study.models import StudyModel

#: The knob searched per strategy; larger values reuse more.
KNOBS = {"teacache": "rel_l1_thresh", "uniform": "interval"}
BISECTIONS = 14


@dataclass(frozen=True)
class Trial:
    value: float
    computed: float  # share of transformer calls that ran the span
    computed_steps: float  # per generation and branch, on average
    psnr: float  # mean over the held-out generations


def check_target(base: dict[str, Any], ratio: float | None = None, min_psnr: float | None = None) -> None:
    """Refuse a strategy without a knob or a target outside its range, before anything runs."""
    if base.get("strategy") not in KNOBS:
        raise ValueError(f"tune knows the knobs of {', '.join(KNOBS)}; got strategy {base.get('strategy')!r}")
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"the computed-call ratio must be in (0, 1], got {ratio}")
    if min_psnr is not None and not min_psnr > 0:
        raise ValueError(f"the PSNR floor must be a positive number of dB, got {min_psnr}")


@dataclass
class TuneResult:
    knob: str
    chosen: Trial
    trials: list[Trial] = field(default_factory=list)
    met: bool = True  # whether the chosen setting meets the target
    missed: str = ""  # by how much, where it does not

    def config(self, base: dict[str, Any]) -> dict[str, Any]:
        value = int(self.chosen.value) if self.knob == "interval" else self.chosen.value
        return {**base, self.knob: value}


class Tuner:
    """Measures settings of one policy on fixed held-out (seed, condition) pairs."""

    def __init__(self, model: StudyModel, base: dict[str, Any], seeds: list[int], conditions: list[str]) -> None:
        check_target(base)
        self.model = model
        self.base = base
        self.knob = KNOBS[base["strategy"]]
        self.pairs = [(seed, condition) for seed in seeds for condition in conditions]
        self.references = {pair: model.generate(*pair) for pair in self.pairs}

    def measure(self, value: float) -> Trial:
        config = {**self.base, self.knob: int(value) if self.knob == "interval" else value}
        outputs, computed, calls, steps = [], 0, 0, []
        with cachekit.apply(self.model.target, config) as handle:
            for pair in self.pairs:
                outputs.append(self.model.generate(*pair))
                for branch in handle.stats.last.branches.values():
                    computed += branch.sites["span"].computed
                    calls += branch.calls
                    steps.append(branch.sites["span"].computed)
        references = torch.cat([self.references[pair] for pair in self.pairs])
        return Trial(value, computed / calls, statistics.fmean(steps), psnr(torch.cat(outputs), references))

    def to_ratio(self, target: float, tolerance: float = 0.05) -> TuneResult:
        """The setting whose computed-call share is closest to `target` (0-1]; not met when even
        that one is further than `tolerance` from it."""
        check_target(self.base, ratio=target)
        result = self._search(
            reuse_more=lambda trial: trial.computed > target,
            best=lambda trials: min(trials, key=lambda trial: abs(trial.computed - target)),
        )
        if abs(result.chosen.computed - target) > tolerance:
            result.met = False
            result.missed = f"it computes {result.chosen.computed:.1%} of calls, the target {target:.1%}"
        return result

    def to_psnr(self, floor: float) -> TuneResult:
        """The most reusing setting whose PSNR stays at or above `floor` dB (else the best PSNR)."""

        check_target(self.base, min_psnr=floor)

        def best(trials: list[Trial]) -> Trial:
            meeting = [trial for trial in trials if trial.psnr >= floor]
            return min(meeting, key=lambda t: t.computed) if meeting else max(trials, key=lambda t: t.psnr)

        result = self._search(reuse_more=lambda trial: trial.psnr >= floor, best=best)
        if result.chosen.psnr < floor:
            result.met = False
            result.missed = f"its PSNR is {result.chosen.psnr:.2f} dB, the floor {floor:.2f} dB"
        return result

    def _search(self, reuse_more: Callable[[Trial], bool], best: Callable[[list[Trial]], Trial]) -> TuneResult:
        trials: list[Trial] = []
        if self.knob == "interval":  # intervals 1, 2, ... until reusing more is not wanted
            for interval in range(1, self.model.spec.steps + 1):
                trials.append(self.measure(interval))
                if not reuse_more(trials[-1]):
                    break
        else:  # thresholds: bisection on a log scale, larger reuses more
            low, high = math.log(1e-4), math.log(10.0)
            for _ in range(BISECTIONS):
                middle = (low + high) / 2
                trials.append(self.measure(math.exp(middle)))
                low, high = (middle, high) if reuse_more(trials[-1]) else (low, middle)
        return TuneResult(self.knob, best(trials), trials)
