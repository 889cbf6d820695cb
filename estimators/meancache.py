"""MeanCache (arXiv 2601.19961): a skipped call gets the value's average over its step instead of
the last value, v_avg = v_last - JVP (next sigma - sigma).

The JVP is the value's rate of change along the trajectory, measured as MeanCache measures it:
from the last `span` values handed out (computed, or estimated and handed out in turn) with the
noise levels of their steps, JVP = (v_first - v_mean) / (sigma_end - sigma_start), where v_mean is
the average the trajectory moved with over those steps. Under an Euler sampler the latents move by
v (next sigma - sigma) per step, so that average is the values' mean weighted by their steps'
sigma intervals: MeanCache's (x_end - x_start) / (sigma_end - sigma_start), read from the values
themselves, per CFG branch and per site.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from cachekit.errors import EstimatorError
from cachekit.estimator import Estimator
from cachekit.hookspecs import hookimpl
from cachekit.schemas.estimators import MeanCacheConfig
from cachekit.strategy import Step

#: One handed-out value: (value, its step's sigma, the next step's sigma).
Entry = tuple[torch.Tensor, float, float]


class MeanCacheEstimator(Estimator[MeanCacheConfig]):
    config_class = MeanCacheConfig
    trajectory = frozenset({"sigma"})

    def new_state(self) -> deque[Entry]:
        return deque(maxlen=self.config.span)

    def record(self, state: deque[Entry], value: torch.Tensor, step: Step) -> None:
        state.append((value, *_interval(step)))

    def estimate(self, state: deque[Entry], step: Step) -> torch.Tensor:
        sigma, next_sigma = _interval(step)
        first, newest = state[0][0], state[-1][0]
        spanned = sum(end - start for _, start, end in state)
        if len(state) < 2 or spanned == 0:
            estimate = newest
        else:
            mean = sum(value * ((end - start) / spanned) for value, start, end in state)
            jvp = (first - mean) / spanned
            estimate = newest - jvp * (next_sigma - sigma)
        state.append((estimate, sigma, next_sigma))  # handed out: the trajectory moved with it
        return estimate

    def kept(self, state: deque[Entry]) -> list[torch.Tensor]:
        return [value for value, _, _ in state]

    def slots(self) -> int:
        return self.config.span


def _interval(step: Step) -> tuple[float, float]:
    if step.sigma is None or step.next_sigma is None:
        raise EstimatorError(f"meancache was given step {step.index} without its noise levels (sigma, next sigma)")
    return step.sigma, step.next_sigma


@hookimpl
def cachekit_register_estimators(register: Callable[[type[Estimator[Any]]], None]) -> None:
    register(MeanCacheEstimator)
