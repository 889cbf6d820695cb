"""The schedule search: which steps to compute for a budget, found offline on calibration prompts.

A mask is a path 0 = c_0 < c_1 < ... < c_{K-1} < N (the end) through the N steps: the K steps c_k
are computed, those between produced by the estimator. Each edge "compute at i, next at j" has a
cost, measured once with the config's estimator in the loop: the RMS error, against the uncached
trajectory, of the latents reached at j when step i starts from the uncached latents. Runs that
put the uncached latents back at every computed step (teacher forcing) measure a whole row of
edges per generation: N·L transformer calls per calibration sample for edges up to L steps long.
LeMiCa weighs its edges by the error of the final sample instead, which costs N²·L calls. Edge
costs are averaged over a few of the calibration samples (`EDGE_SAMPLES`); a local
cost ignores how an error grows after j, so the final choice is made on whole generations: a
dynamic program finds, for K steps, the path with the least total cost and the one with the least
sum of squared costs (which spreads the error instead of piling it on one edge, as LeMiCa's
minimax does); those and the evenly spaced mask are generated in full on the calibration prompts
and the best by the primary metric is kept.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

import cachekit
from cachekit.budget import BudgetError

if TYPE_CHECKING:
    from cachekit.study.models import StudyModel
    from cachekit.tune import Tuner, TuneResult

#: (i, j): compute at step i, next at j (j = the step count: the end).
Edge = tuple[int, int]
#: Calibration samples the edge costs are averaged over: a cost ranks edges, which few samples
#: settle; the candidate masks are then judged on every sample.
EDGE_SAMPLES = 4


def best_path(costs: Mapping[Edge, float], steps: int, computed: int) -> tuple[str, float] | None:
    """The mask of `steps` steps that computes `computed` of them, step 0 first, whose edges
    (only those in `costs`, the last one to `steps`) cost least in total, with that total; None
    where no path of that many steps exists. Ties go to the mask whose computed steps come first."""
    incoming: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for (i, j), cost in sorted(costs.items()):
        incoming[j].append((i, cost))
    # best[k][j]: the least cost of a path whose k-th computed step is j, and the step before it
    best: list[dict[int, tuple[float, int]]] = [{}, {0: (0.0, -1)}]
    for _ in range(2, computed + 1):
        reached: dict[int, tuple[float, int]] = {}
        for j in range(1, steps):
            options = [(best[-1][i][0] + cost, i) for i, cost in incoming[j] if i in best[-1]]
            if options:
                reached[j] = min(options)
        best.append(reached)
    ends = [(best[computed][i][0] + cost, i) for i, cost in incoming[steps] if i in best[computed]]
    if computed < 1 or not ends:
        return None
    total, step = min(ends)
    chosen = set()
    for k in range(computed, 0, -1):
        chosen.add(step)
        step = best[k][step][1]
    return mask_of(chosen, steps), total


def evenly_spaced(steps: int, computed: int) -> str:
    """The mask computing `computed` steps spread as evenly as the step count allows, step 0 first."""
    return mask_of({k * steps // computed for k in range(computed)}, steps)


def mask_of(computed: set[int], steps: int) -> str:
    """The mask of `steps` steps that computes the steps `computed`."""
    return "".join("1" if index in computed else "0" for index in range(steps))


class EdgeCosts:
    """The measured edge costs of one model, strategy config and set of calibration samples,
    extended to longer edges as a smaller budget needs them."""

    def __init__(self, model: StudyModel, base: dict[str, Any], pairs: list[tuple[int, str]], bar: Any) -> None:
        self.model, self.base, self.pairs, self.bar = model, base, pairs, bar
        self.steps = model.spec.steps
        # a computed step from the uncached latents gives the uncached latents again
        self.costs: dict[Edge, float] = {(i, i + 1): 0.0 for i in range(self.steps)}
        self.longest = 1
        self._trajectories: dict[tuple[int, str], list[torch.Tensor]] = {}

    def up_to(self, longest: int) -> dict[Edge, float]:
        """The costs of every edge up to `longest` steps, measuring those not yet measured."""
        longest = min(longest, self.steps)
        gaps = range(self.longest + 1, longest + 1)
        self.bar.total += len(self.pairs) * (sum(gaps) + (0 if self._trajectories else 1))
        if not self._trajectories:
            self._trajectories = {pair: self._trajectory(pair) for pair in self.pairs}
        for gap in gaps:  # one run per offset: computed at offset, offset + gap, ... (and step 0)
            measured: dict[Edge, list[float]] = defaultdict(list)
            for offset in range(gap):
                computed = {0, *range(offset, self.steps, gap)}
                with cachekit.apply(self.model.target, {**self.base, "mask": mask_of(computed, self.steps)}):
                    for pair in self.pairs:
                        for edge, error in self._forced(pair, computed).items():
                            if edge[1] - edge[0] == gap:  # its history spaced like the edge itself
                                measured[edge].append(error)
                        self.bar.update()
            self.costs.update({edge: statistics.fmean(errors) for edge, errors in measured.items()})
        self.longest = max(self.longest, longest)
        return self.costs

    def _trajectory(self, pair: tuple[int, str]) -> list[torch.Tensor]:
        """The uncached latents after each step."""
        latents: list[torch.Tensor] = []
        self.model.generate(*pair, on_step=lambda index, x: latents.append(x.clone()))
        self.bar.update()
        return latents

    def _forced(self, pair: tuple[int, str], computed: set[int]) -> dict[Edge, float]:
        """One generation computing the steps `computed`, put back on the uncached trajectory
        before each of them: the error of the latents reached at each computed step (and the end)."""
        reference = self._trajectories[pair]
        errors: dict[Edge, float] = {}
        last = 0

        def on_step(index: int, latents: torch.Tensor) -> torch.Tensor | None:
            nonlocal last
            reached = index + 1  # the step these latents go into (the step count: the end)
            if reached not in computed and reached != self.steps:
                return None
            difference = latents.float() - reference[index].float()
            errors[(last, reached)] = difference.square().mean().sqrt().item()
            last = reached
            return reference[index].clone()

        self.model.generate(*pair, on_step=on_step)
        return errors


def search(tuner: Tuner, budget: float) -> TuneResult:
    """The mask, for `tuner`'s strategy config and calibration samples, that computes as many
    steps as `budget` allows and scores best by the primary metric (see the module's docstring)."""
    from cachekit.tune import TuneResult

    steps = tuner.model.spec.steps
    computed = math.floor(budget * steps + 1e-9)
    if computed < 1:
        tuner.bar.close()
        raise BudgetError(
            f"schedule cannot spend as little as {budget:.1%} of block executions at {steps} steps: it computes "
            f"at least the first step; give a budget of at least {math.ceil(1000 / steps) / 1000:.1%}"
        )
    if tuner.edges is None:
        samples = tuner.pairs[:: max(1, len(tuner.pairs) // EDGE_SAMPLES)][:EDGE_SAMPLES]
        tuner.edges = EdgeCosts(tuner.model, tuner.base, samples, tuner.bar)
    costs = tuner.edges.up_to(2 * math.ceil(steps / computed))
    candidates = [evenly_spaced(steps, computed)]
    for squared in (False, True):
        found = best_path({edge: cost**2 if squared else cost for edge, cost in costs.items()}, steps, computed)
        if found is not None and found[0] not in candidates:
            candidates.append(found[0])
    tuner.bar.total += len(candidates) * len(tuner.pairs)
    trials = [tuner.measure(mask) for mask in candidates]
    tuner.bar.close()
    chosen = max(trials, key=lambda trial: trial.quality if tuner.higher else -trial.quality)
    return TuneResult(tuner.knob, tuner.metric.name, chosen, trials)
