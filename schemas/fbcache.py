"""First-Block Cache and its generalisation DBCache: the config."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from cachekit.schemas.configs import StrategyConfig


class FBCacheConfig(StrategyConfig):
    """Always run the first `first_blocks` (Fn) and the last `last_blocks` (Bn) blocks; skip the
    blocks between while the first blocks' residual has changed by at most `threshold` (relative
    L1) since the last call that computed them (First-Block Cache at Fn = 1, Bn = 0; DBCache).
    """

    model_config = ConfigDict(allow_inf_nan=False)

    strategy: Literal["fbcache"] = "fbcache"
    threshold: float = Field(
        default=0.05, ge=0, description="Skip while the first blocks' residual changed by at most this (relative L1)."
    )
    first_blocks: int = Field(default=1, ge=1, description="Fn: blocks at the start that always run (the signal).")
    last_blocks: int = Field(default=0, ge=0, description="Bn: blocks at the end that always run.")
    warmup_steps: int = Field(default=0, ge=0, description="Steps always computed first.")
    max_cached_steps: int | None = Field(
        default=None, ge=0, description="At most this many skipped steps per branch in a generation (None: no cap)."
    )
    max_consecutive_cached: int | None = Field(
        default=None, ge=0, description="At most this many skipped steps in a row (None: no cap)."
    )
    compute_last_step: bool = Field(default=False, description="Always compute the last step.")
