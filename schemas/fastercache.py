"""FasterCache's config: its attention reuse and its CFG-Cache, with the published defaults."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cachekit.schemas.branches import BranchLevelConfig
from cachekit.schemas.configs import Estimator, StrategyConfig
from cachekit.schemas.estimators import ExtrapolateConfig, FasterCacheDifferenceConfig

__all__ = ["FASTERCACHE_BRANCHES", "FasterCacheConfig"]

#: FasterCache's CFG-Cache: the second branch computed every 5th step, skipped only below timestep 641,
#: produced with the frequency-weighted difference.
FASTERCACHE_BRANCHES = BranchLevelConfig(interval=5, window=(-1.0, 641.0), estimator=FasterCacheDifferenceConfig())


class FasterCacheConfig(StrategyConfig):
    """FasterCache (arXiv 2410.19355). Self-attention outputs are reused on the calls that run without
    their CFG partner (the branch level skipped it), every step but each `attention_interval`-th, while
    the timestep is inside `attention_window`; a reused output is the last one extrapolated by
    `estimator` (the newest plus half its last change). `branches` is FasterCache's CFG-Cache; a dict
    given for it changes only the fields it names. `branches=None` is a guidance-distilled model's
    setting: attention is then reused on every call the rule allows."""

    strategy: Literal["fastercache"] = "fastercache"

    attention_interval: int = Field(
        default=2, ge=1, le=1000, description="Compute self-attention every N-th step (1 = never reuse)."
    )
    attention_window: tuple[float, float] = Field(
        default=(-1.0, 681.0), description="(low, high): reuse only where low < timestep < high (0-1000 scale)."
    )
    temporal_interval: int | None = Field(
        default=None, ge=1, le=1000, description="Reuse temporal self-attention too, every N-th step (None: never)."
    )
    temporal_window: tuple[float, float] = Field(default=(-1.0, 681.0), description="As attention_window, temporal.")
    estimator: Estimator = Field(
        default=ExtrapolateConfig(),
        description="How a reused attention output is produced: FasterCache's extrapolation (weight 0.5) by default.",
    )
    branches: BranchLevelConfig | None = Field(
        default=FASTERCACHE_BRANCHES,
        description="FasterCache's CFG-Cache (interval 5, window (-1, 641), the fastercache difference); a dict "
        "changes the fields it names, e.g. {'cfg': 'batched'}; None for a guidance-distilled model.",
    )

    @model_validator(mode="before")
    @classmethod
    def _branches_over_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("branches"), dict):
            data = {**data, "branches": {**FASTERCACHE_BRANCHES.model_dump(), **data["branches"]}}
        return data

    @model_validator(mode="after")
    def _ordered_windows(self) -> FasterCacheConfig:
        for name in ("attention_window", "temporal_window"):
            low, high = getattr(self, name)
            if not low < high:
                raise ValueError(f"{name} must be (low, high) with low < high, got {(low, high)}")
        return self
