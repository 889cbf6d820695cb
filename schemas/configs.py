"""Strategy configs: what a user writes to choose and tune a cache strategy.

Pure data (no torch), so a config file can be validated anywhere. Every strategy, built-in or
plugin, brings a subclass of `StrategyConfig` whose `strategy` field is a fixed literal naming it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SerializeAsAny, model_validator

from cachekit.schemas.branches import BranchLevelConfig
from cachekit.schemas.estimators import CopyConfig, EstimatorConfig, parse_estimator
from cachekit.schemas.named import NamedConfig

#: A share of a generation's block executions: what a budget asks to spend at most.
Share = Annotated[float, Field(gt=0, le=1)]
#: An estimator config, or its kind name, or a dict with its ``kind``.
Estimator = Annotated[SerializeAsAny[EstimatorConfig], BeforeValidator(parse_estimator)]


class StrategyConfig(NamedConfig):
    """Fields every strategy shares. Unknown fields are rejected, values are immutable."""

    name_field = "strategy"
    strategy: str
    num_inference_steps: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Steps in one generation. Needed only on a bare transformer by strategies that must "
            "know the last step; on a pipeline it is read from the scheduler."
        ),
    )
    estimator: Estimator = Field(
        default=CopyConfig(),
        description='How a skipped value is produced: "copy" (the last computed value), "taylor" (a forecast '
        'from the last computed values, e.g. {"kind": "taylor", "order": 2}), "foca", or a plugin\'s kind.',
    )
    budget: Share | None = Field(
        default=None,
        description="The share of block executions to spend at most, instead of the strategy's knob: the knob "
        "comes from the file `tuned` names (`cachekit tune ... --budget B --save FILE`).",
    )
    speedup: float | None = Field(default=None, ge=1, description="A budget as its inverse: 5 is a budget of 0.2.")
    tuned: str | None = Field(
        default=None, description="The file of settings `cachekit tune --budget ... --save` chose, for `budget`."
    )
    branches: BranchLevelConfig | None = Field(
        default=None,
        description="The branch level: with CFG, produce the second branch from the first on most steps "
        '(e.g. {"interval": 3}); None: every branch is computed (as the strategy decides).',
    )
    max_kept_bytes: int | None = Field(
        default=None,
        ge=0,
        description="The most the strategy may keep (cached values and their history, over every CFG branch). "
        "Checked from the first computed call, before the device runs out; on CUDA the device's free memory "
        "is checked too.",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> StrategyConfig:
        if self.budget is not None and self.speedup is not None:
            raise ValueError("give budget or speedup (its inverse), not both")
        if self.tuned is not None and self.spending() is None:
            raise ValueError("tuned names the settings tuned for a budget: give budget (or speedup) too")
        return self

    def spending(self) -> float | None:
        """The budget asked for (a speedup as its inverse), or None."""
        return self.budget if self.speedup is None else 1 / self.speedup


class UniformConfig(StrategyConfig):
    """Compute every `interval`-th step, the first `warmup` steps and the last step; reuse the
    residual of the last computed step in between."""

    strategy: Literal["uniform"] = "uniform"

    interval: int = Field(default=2, ge=1, le=1000, description="Compute every N-th step (1 = never reuse).")
    warmup: int = Field(default=1, ge=1, description="Steps always computed at the start.")
