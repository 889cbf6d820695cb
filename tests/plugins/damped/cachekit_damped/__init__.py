"""A third-party estimator, packaged as users publish them (the README's example): a skipped
value continues the last computed change per step, damped by `damping` (0 copies the last value,
1 extrapolates linearly)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cachekit import Estimator, hookimpl
from cachekit.schemas import EstimatorConfig


class DampedConfig(EstimatorConfig):
    kind: Literal["damped"] = "damped"
    damping: float = Field(default=0.5, ge=0, le=1)


class DampedEstimator(Estimator[DampedConfig]):
    """The last computed value, continued along its last change per step, damped."""

    config_class = DampedConfig

    def new_state(self):  # one per tensor of a cached value, per branch
        return {"steps": [], "values": []}

    def record(self, state, value, step):  # `value` was computed at `step` (index, timestep)
        state["steps"] = [*state["steps"][-1:], step.index]
        state["values"] = [*state["values"][-1:], value]

    def estimate(self, state, step):  # the value for a call skipped at `step`
        if len(state["values"]) < 2:
            return state["values"][-1]
        (s0, s1), (v0, v1) = state["steps"], state["values"]
        return v1 + (v1 - v0) / (s1 - s0) * (self.config.damping * (step.index - s1))

    def kept(self, state):  # the tensors it holds, for handle.stats' memory figures
        return state["values"]


@hookimpl
def cachekit_register_estimators(register):
    register(DampedEstimator)
