"""SeaCache's config: a spectrally filtered change of the latent decides, an extrapolated residual fills in."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from cachekit.schemas.configs import Estimator, StrategyConfig
from cachekit.schemas.estimators import TaylorConfig


class SeaCacheConfig(StrategyConfig):
    """SeaCache (arXiv 2602.18993): the noisy latent, filtered towards its clean content by a
    spectral prior (power law of exponent `power_exp`, weighed against the noise level), is
    compared with the previous step's; the block stack is skipped while the accumulated relative
    change stays below `threshold`, at most `max_consecutive_cached` steps in a row. Skipped
    residuals are extrapolated linearly from the last two computed ones."""

    model_config = ConfigDict(allow_inf_nan=False)

    strategy: Literal["seacache"] = "seacache"
    threshold: float = Field(default=0.25, ge=0, description="Compute once the accumulated change reaches this.")
    retention_steps: int = Field(default=1, ge=0, description="Steps always computed first.")
    cache_end_steps: int = Field(default=1, ge=0, description="Steps always computed last.")
    max_consecutive_cached: int = Field(default=2, ge=0, description="At most this many skips in a row (0: no cap).")
    power_exp: float = Field(default=3.0, gt=0, description="Exponent of the clean signal's power-law spectrum.")
    estimator: Estimator = Field(
        default=TaylorConfig(order=1, spacing="step"),
        description="How skipped residuals are produced: linear extrapolation over step counts, as the paper and "
        "diffusers' SeaCacheConfig (residual_order 1); {'kind': 'copy'} is residual_order 0.",
    )
