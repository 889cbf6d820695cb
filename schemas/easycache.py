"""EasyCache's config: a runtime test of the transformation rate, nothing calibrated."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from cachekit.schemas.configs import StrategyConfig


class EasyCacheConfig(StrategyConfig):
    """EasyCache (arXiv 2507.02860): the model's output changes in proportion to its input, at a
    rate k measured between the last two computed steps; the block stack is skipped while the
    accumulated predicted change of the output, k * |x_t - x_t-1| / |v|, stays below `threshold`.
    The first `warmup_steps` and the last step compute."""

    model_config = ConfigDict(allow_inf_nan=False)

    strategy: Literal["easycache"] = "easycache"
    threshold: float = Field(default=0.05, gt=0, description="tau: compute once the accumulated change reaches this.")
    warmup_steps: int = Field(default=10, ge=2, description="R: steps always computed first (the rate needs two).")
    compute_last_step: bool = True
