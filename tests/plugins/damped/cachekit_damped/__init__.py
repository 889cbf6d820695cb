"""A third-party estimator, packaged as users publish them: a skipped value continues the last
computed change per step, damped by `damping` (0 copies the last value, 1 extrapolates linearly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from cachekit import Estimator, hookimpl
from cachekit.schemas import EstimatorConfig


class DampedConfig(EstimatorConfig):
    kind: Literal["damped"] = "damped"
    damping: float = Field(default=0.5, ge=0, le=1)


@dataclass
class _Last:
    steps: list[int] = field(default_factory=list)  # the last two computed steps
    values: list[torch.Tensor] = field(default_factory=list)  # and their values


class DampedEstimator(Estimator[DampedConfig]):
    config_class = DampedConfig

    def new_state(self):
        return _Last()

    def record(self, state, value, step):
        state.steps = [*state.steps[-1:], step.index]
        state.values = [*state.values[-1:], value]

    def estimate(self, state, step):
        if len(state.values) < 2:
            return state.values[-1]
        per_step = (state.values[1] - state.values[0]) / (state.steps[1] - state.steps[0])
        return state.values[1] + per_step * (self.config.damping * (step.index - state.steps[1]))

    def kept(self, state):
        return state.values


@hookimpl
def cachekit_register_estimators(register):
    register(DampedEstimator)
