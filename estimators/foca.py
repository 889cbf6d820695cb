"""FoCa (arXiv 2508.16211): features along the sampling trajectory treated as an ODE, forecast by a
BDF2 predictor and calibrated by a Heun corrector, over the last two computed values and the last
two values handed out (computed or forecast). Nothing to tune.

At e steps after the last computed call, with d_full the change between the last two computed
values and d_local the change between the last two values handed out:
e <= 3: F = F_full + e/2 (d_full + d_local);
e > 3:  F = w (F_full + 3/2 (d_full + d_local)) + (1 - w) F_full, w = 3/e (the step damped).
With fewer than two of either, the last computed value is copied. Follows the formulation
cache-dit 1.5.3 implements (the authors' code is unreleased).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cachekit.estimator import Estimator
from cachekit.hookspecs import hookimpl
from cachekit.schemas.estimators import FoCaConfig
from cachekit.strategy import Step

#: Beyond this many steps from the last computed one, the corrected step is damped.
DAMPING_AFTER = 3


@dataclass
class _Trajectory:
    computed_at: int = 0
    computed: list[torch.Tensor] = field(default_factory=list)  # the last two computed values, oldest first
    handed: list[torch.Tensor] = field(default_factory=list)  # the last two values handed out, oldest first


class FoCaEstimator(Estimator[FoCaConfig]):
    config_class = FoCaConfig

    def new_state(self) -> _Trajectory:
        return _Trajectory()

    def record(self, state: _Trajectory, value: torch.Tensor, step: Step) -> None:
        state.computed_at = step.index
        state.computed = [*state.computed[-1:], value]
        state.handed = [*state.handed[-1:], value]

    def estimate(self, state: _Trajectory, step: Step) -> torch.Tensor:
        last = state.computed[-1]
        if len(state.computed) < 2 or len(state.handed) < 2:
            forecast = last
        else:
            slope = (last - state.computed[0]) + (state.handed[1] - state.handed[0])
            gap = step.index - state.computed_at
            if gap <= DAMPING_AFTER:
                forecast = last + slope * (gap / 2)
            else:
                weight = DAMPING_AFTER / gap
                forecast = (last + slope * 1.5) * weight + last * (1 - weight)
        state.handed = [state.handed[-1], forecast]
        return forecast

    def kept(self, state: _Trajectory) -> list[torch.Tensor]:
        unique = {id(t): t for t in [*state.computed, *state.handed]}
        return list(unique.values())

    def slots(self) -> int:
        return 4  # the last two computed values and the last two handed out


@hookimpl
def cachekit_register_estimators(register: Callable[[type[Estimator[Any]]], None]) -> None:
    register(FoCaEstimator)
