"""Taylor forecast (TaylorSeer, arXiv 2503.06923): the value of a skipped call is a Taylor
expansion around the last computed one, F(x) = sum_k F_k (x - x_last)^k / k!, where F_0 is the
last computed value and F_{k+1} = (F_k - previous F_k) / (x_last - x_previous) are recursive
finite differences over the computed calls. x is the timestep, or the step count (`spacing`).

An order-k forecast needs k + 1 computed values; with fewer, it uses the orders it has (one value
is a copy). This is the recursion diffusers' TaylorSeerCacheConfig and the authors' code compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cachekit.estimator import Estimator
from cachekit.hookspecs import hookimpl
from cachekit.schemas.estimators import TaylorConfig
from cachekit.strategy import Step


@dataclass
class _Factors:
    at: float | None = None  # where the last value was computed
    factors: list[torch.Tensor] = field(default_factory=list)  # F_0 .. F_k


class TaylorEstimator(Estimator[TaylorConfig]):
    config_class = TaylorConfig

    def _position(self, step: Step) -> float:
        return step.timestep if self.config.spacing == "timestep" else float(step.index)

    def new_state(self) -> _Factors:
        return _Factors()

    def record(self, state: _Factors, value: torch.Tensor, step: Step) -> None:
        at = self._position(step)
        factors = [value]
        if state.at is not None and at != state.at:
            gap = at - state.at
            for previous in state.factors[: self.config.order]:
                factors.append((factors[-1] - previous) / gap)
        state.at, state.factors = at, factors

    def estimate(self, state: _Factors, step: Step) -> torch.Tensor:
        assert state.at is not None
        distance = self._position(step) - state.at
        value = state.factors[0]
        for order, factor in enumerate(state.factors[1:], start=1):
            value = value + factor * (distance**order / math.factorial(order))
        return value

    def kept(self, state: _Factors) -> list[torch.Tensor]:
        return state.factors

    def slots(self) -> int:
        return self.config.order + 1


@hookimpl
def cachekit_register_estimators(register: Callable[[type[Estimator[Any]]], None]) -> None:
    register(TaylorEstimator)
