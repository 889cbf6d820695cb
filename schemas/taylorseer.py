"""TaylorSeer's config: a fixed compute interval, every skipped value a Taylor forecast."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cachekit.schemas.configs import Estimator, StrategyConfig
from cachekit.schemas.estimators import TaylorConfig


class TaylorSeerConfig(StrategyConfig):
    """TaylorSeer (arXiv 2503.06923): compute the first `warmup_steps` steps, then every
    `interval`-th step after the first forecast one (steps warmup + 1, warmup + 1 + interval, ...),
    and every step from `cooldown_from` on; forecast the rest. `level` says what is forecast: the
    whole block stack's residual, each attention module's output (as diffusers' hook does by
    default), or each attention and MLP output (as the authors' code does)."""

    strategy: Literal["taylorseer"] = "taylorseer"
    interval: int = Field(default=5, ge=1, le=1000, description="N: steps between computed steps.")
    warmup_steps: int = Field(default=3, ge=1, description="D: steps always computed first (the forecast's history).")
    cooldown_from: int | None = Field(default=None, ge=1, description="A: every step from this one on computes.")
    level: Literal["span", "attention", "modules"] = "attention"
    estimator: Estimator = Field(
        default=TaylorConfig(order=1, spacing="step"),
        description="How skipped values are produced: a first-order Taylor forecast over step counts, as "
        "diffusers' TaylorSeerCacheConfig; any estimator may replace it.",
    )

    @model_validator(mode="after")
    def _cooldown_after_warmup(self) -> TaylorSeerConfig:
        if self.cooldown_from is not None and self.cooldown_from <= self.warmup_steps:
            raise ValueError(
                f"cooldown_from ({self.cooldown_from}) must come after the warm-up ({self.warmup_steps} steps)"
            )
        return self
