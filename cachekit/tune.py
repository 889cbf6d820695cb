"""Tune a strategy's knob to a target: a share of block executions, or a bound on the primary
quality metric against the uncached output (at least so much PSNR, at most so much LPIPS),
measured on held-out seeds."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cachekit import schedule
from cachekit.budget import BudgetError, TunedSetting, base_of
from cachekit.counting import WorkCounter
from cachekit.metric import Sample
from cachekit.registry import get_strategy, list_strategies, make_config, resolve_adapter
from cachekit.schemas.diffusers_methods import DIFFUSERS_METHODS
from cachekit.schemas.files import read_table
from cachekit.schemas.teacache import TeaCachePreset
from cachekit.strategy import Knob
from cachekit.study.diffusers_methods import KNOBS
from cachekit.study.metrics import DEFAULT_PRIMARY, metrics_for
from cachekit.study.models import StudyModel
from cachekit.study.runner import apply_setting

BISECTIONS = 14
#: A quality trial this close to its bound (relative) ends the search: reusing more would miss it.
QUALITY_CLOSE = 0.01


@dataclass(frozen=True)
class Trial:
    value: float | str  # a mask for a schedule
    computed: float  # share of block executions (counted from the outside)
    computed_steps: float  # per generation and branch, on average
    quality: float  # the primary metric's mean over the held-out generations


def knob_of(base: dict[str, Any]) -> Knob:
    """The knob the strategy of `base` declares; a strategy without one is refused by name."""
    name = base.get("strategy")
    if isinstance(name, str) and name in DIFFUSERS_METHODS:  # diffusers' own, in a study
        return KNOBS[DIFFUSERS_METHODS[name]]
    knob = get_strategy(name).knob if isinstance(name, str) else None
    if knob is None:
        tunable = [strategy for strategy in list_strategies() if get_strategy(strategy).knob is not None]
        raise ValueError(f"strategy {name!r} declares no knob to tune; strategies with one: {', '.join(tunable)}")
    return knob


def check_target(base: dict[str, Any], ratio: float | None = None) -> None:
    """Refuse a strategy without a knob or a target outside its range, before anything runs."""
    knob_of(base)
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"the computed share must be in (0, 1], got {ratio}")


@dataclass
class TuneResult:
    knob: Knob
    metric: str  # the primary metric trials were scored with
    chosen: Trial
    trials: list[Trial] = field(default_factory=list)
    met: bool = True  # whether the chosen setting meets the target
    missed: str = ""  # by how much, where it does not

    def config(self, base: dict[str, Any]) -> dict[str, Any]:
        value = int(self.chosen.value) if self.knob.integer else self.chosen.value
        return {**base, self.knob.field: value}


class Tuner:
    """Measures settings of one strategy on fixed held-out (seed, condition) pairs; `progress`: a bar
    over every generation of the search (the references, then each trial's), with its ETA."""

    def __init__(
        self,
        model: StudyModel,
        base: dict[str, Any],
        seeds: list[int],
        conditions: list[str],
        progress: bool = False,
        primary: str = DEFAULT_PRIMARY,
    ) -> None:
        check_target(base)
        self.metric = metrics_for([], primary).active[0]
        self.higher = self.metric.better == "higher"
        self.model = model
        self.base = base
        self.knob = knob_of(base)
        self.pairs = [(seed, condition) for seed in seeds for condition in conditions]
        trials = model.spec.steps if self.knob.integer else 0 if self.knob.mask else BISECTIONS
        self.edges: schedule.EdgeCosts | None = None  # a schedule's measured edge costs, shared by its budgets
        self._measured: dict[float | str, Trial] = {}  # a setting two searches try is generated once
        self.bar = tqdm(total=len(self.pairs) * (1 + trials), desc="tuning", unit="generation", disable=not progress)
        self.references = {pair: self._generate(pair) for pair in self.pairs}

    def _generate(self, pair: tuple[int, str]) -> torch.Tensor:
        output = self.model.generate(*pair)
        self.bar.update()
        return output

    def measure(self, value: float | str) -> Trial:
        """The knob at `value`: the share of block executions (counted from the outside, as
        studies count them, whatever the strategy's level) and the PSNR over the held-out pairs."""
        if value in self._measured:
            return self._measured[value]
        config = {**self.base, self.knob.field: int(value) if self.knob.integer else value}
        outputs, shares, steps = [], [], []
        self.bar.set_postfix_str(self.knob.show(value))
        transformer = self.model.transformer
        counter = WorkCounter(transformer, resolve_adapter(transformer)(transformer))
        try:
            with apply_setting(self.model.target, config):
                for pair in self.pairs:
                    counter.reset()
                    outputs.append(self._generate(pair))
                    shares.append(counter.work.block_share)
                    steps.append(counter.work.block_share * self.model.spec.steps)
        finally:
            counter.close()
        scores = [
            self.metric(Sample(output.cpu(), self.references[pair].cpu(), pair[1]))
            for output, pair in zip(outputs, self.pairs, strict=True)
        ]
        self._measured[value] = Trial(
            value, statistics.fmean(shares), statistics.fmean(steps), statistics.fmean(scores)
        )
        return self._measured[value]

    def meets(self, trial: Trial, bound: float) -> bool:
        """Whether `trial`'s quality is on the right side of `bound` (at least it, or at most)."""
        return trial.quality >= bound if self.higher else trial.quality <= bound

    def to_ratio(self, target: float, tolerance: float = 0.05) -> TuneResult:
        """The setting whose computed-call share is closest to `target` (0-1]; not met when even
        that one is further than `tolerance` from it."""
        check_target(self.base, ratio=target)
        if self.knob.mask:
            return schedule.search(self, target)
        step_share = 1 / self.model.spec.steps  # what one more computed step changes the share by
        result = self._search(
            reuse_more=lambda trial: trial.computed > target,
            best=lambda trials: min(trials, key=lambda trial: abs(trial.computed - target)),
            done=lambda trial: abs(trial.computed - target) <= min(step_share / 2, tolerance),
        )
        if abs(result.chosen.computed - target) > tolerance:
            result.met = False
            result.missed = f"it computes {result.chosen.computed:.1%} of calls, the target {target:.1%}"
        return result

    def to_budget(self, budget: float) -> TuneResult:
        """The best-scoring setting whose mean share of block executions is at most `budget` (0-1]
        on the held-out pairs. A budget below what the strategy can reach at all (its warm-up,
        forced last step or always-computed blocks) is refused with the smallest reachable share."""
        check_target(self.base, ratio=budget)
        knob = self.knob
        if knob.mask:
            return schedule.search(self, budget)
        most_reuse = self.measure(
            self.model.spec.steps if knob.integer else (knob.high if knob.reuses_more == "higher" else knob.low)
        )
        if most_reuse.computed > budget + 1e-9:
            self.bar.close()
            raise BudgetError(
                f"{self.base['strategy']} cannot spend as little as {budget:.1%} of block executions here: at "
                f"{knob.show(most_reuse.value)}, reusing all it can, it spends {most_reuse.computed:.1%} "
                f"(its warm-up, last step and always-computed blocks); give a budget of at least "
                f"{math.ceil(most_reuse.computed * 1000) / 1000:.1%}"
            )
        step_share = 1 / self.model.spec.steps

        def best(trials: list[Trial]) -> Trial:
            within = [trial for trial in [*trials, most_reuse] if trial.computed <= budget + 1e-9]
            return max(within, key=lambda t: (t.quality if self.higher else -t.quality, -t.computed))

        result = self._search(
            reuse_more=lambda trial: trial.computed > budget,
            best=best,
            done=lambda trial: budget - step_share / 2 <= trial.computed <= budget + 1e-9,
        )
        result.trials.append(most_reuse)
        return result

    def to_quality(self, bound: float) -> TuneResult:
        """The most reusing setting whose primary metric meets `bound` (else the best one)."""
        if self.knob.mask:
            raise ValueError(f"{self.base['strategy']}'s mask is searched for a budget: give --budget, not --quality")

        def best(trials: list[Trial]) -> Trial:
            meeting = [trial for trial in trials if self.meets(trial, bound)]
            if meeting:
                return min(meeting, key=lambda t: t.computed)
            return max(trials, key=lambda t: t.quality if self.higher else -t.quality)

        def close(trial: Trial) -> bool:  # met, and no more than 1% from the bound: reusing more would miss it
            return self.meets(trial, bound) and abs(trial.quality - bound) <= QUALITY_CLOSE * max(abs(bound), 1e-9)

        result = self._search(reuse_more=lambda trial: self.meets(trial, bound), best=best, done=close)
        if not self.meets(result.chosen, bound):
            result.met = False
            side = "at least" if self.higher else "at most"
            result.missed = f"its {self.metric.name} is {result.chosen.quality:.4g}, the target {side} {bound:.4g}"
        return result

    def _search(
        self, reuse_more: Callable[[Trial], bool], best: Callable[[list[Trial]], Trial], done: Callable[[Trial], bool]
    ) -> TuneResult:
        """Try the knob's values (intervals in order, thresholds by bisection) until reusing more is
        not wanted, or a trial is `done` (the target met as closely as the search can)."""
        trials: list[Trial] = []
        knob = self.knob
        if knob.integer:  # intervals 1, 2, ... until reusing more is not wanted
            for interval in range(1, self.model.spec.steps + 1):
                trials.append(self.measure(interval))
                if done(trials[-1]) or not reuse_more(trials[-1]):
                    break
        else:  # thresholds: bisection on a log scale
            low, high = math.log(knob.low), math.log(knob.high)
            for _ in range(BISECTIONS):
                middle = (low + high) / 2
                trials.append(self.measure(math.exp(middle)))
                if done(trials[-1]):
                    break
                further = reuse_more(trials[-1]) == (knob.reuses_more == "higher")
                low, high = (middle, high) if further else (low, middle)
        self.bar.total = self.bar.n  # the search may end before its last trial
        self.bar.close()
        return TuneResult(self.knob, self.metric.name, best(trials), trials)


def tuned_setting(model: StudyModel, base: dict[str, Any], result: TuneResult, budget: float) -> TunedSetting:
    """What `cachekit tune --budget B --save FILE` stores: the setting chosen for the budget, with
    the model, config and step count it holds for."""
    return setting_for(model, base_of(make_config(result.config(base)), result.knob.field), result, budget)


def setting_for(model: StudyModel, matched: dict[str, Any], result: TuneResult, budget: float) -> TunedSetting:
    """The setting `result` chose for `budget` on `model`, kept for the config `matched`."""
    chosen = result.chosen
    return TunedSetting(
        identity=model.identity(),
        config=matched,
        steps=model.spec.steps,
        budget=budget,
        knob=result.knob.field,
        value=chosen.value,
        spent=chosen.computed,
        quality=chosen.quality,
        metric=result.metric,
    )


def preset_file(base: dict[str, Any]) -> Path:
    """The calibrated preset file a TeaCache strategy reads, where `--write` stores the threshold."""
    preset = base.get("preset")
    if base.get("strategy") != "teacache" or not isinstance(preset, str) or not preset.endswith(".json"):
        raise ValueError(
            "--write stores the tuned threshold in the strategy's preset file: give a TeaCache config whose preset is "
            'a calibrated .json file, e.g. \'{"strategy": "teacache", "preset": "my-model.json"}\''
        )
    if not Path(preset).is_file():
        raise ValueError(f"--write: the preset file {preset!r} does not exist (run `cachekit calibrate` first)")
    if not os.access(preset, os.W_OK):
        raise ValueError(
            f"--write: the preset file {preset!r} is read-only: make it writable, or copy it and tune the copy "
            "(checked before tuning, so no trial is lost)"
        )
    return Path(preset)


def write_threshold(base: dict[str, Any], result: TuneResult, target: str) -> Path:
    """Store the chosen threshold in the strategy's preset file as its first, so
    `TeaCacheConfig(preset=...)` takes it; the preset's notes say what it was tuned to."""
    path = preset_file(base)
    preset = TeaCachePreset.model_validate(read_table(path))
    value, chosen = result.chosen.value, result.chosen
    note = f"rel_l1_thresh {value:.5g} tuned to {target}: {chosen.computed:.1%} of calls computed, "
    note += f"{result.metric} {chosen.quality:.4g} on held-out seeds"
    updated = preset.model_copy(
        update={
            "thresholds": (value, *(other for other in preset.thresholds if other != value)),
            "notes": "; ".join(part for part in (preset.notes, note) if part),
        }
    )
    path.write_text(updated.model_dump_json(indent=2) + "\n")
    return path
