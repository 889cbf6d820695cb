"""diffusers' own caching methods as study strategies: the baselines cachekit's methods are compared with.

Each config mirrors the fields of the diffusers config it stands for (diffusers 0.42.1), under a
``strategy`` named ``diffusers.<method>``; cachekit runs it through diffusers' hooks, giving them
the cache context (branch, step, sigma) they need from the model's own calls, so a study puts them
beside cachekit's methods on the same cells.

    [[strategies]]
    strategy = "diffusers.first_block_cache"
    sweep.threshold = [0.05, 0.1]
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from cachekit.schemas.configs import Share
from cachekit.schemas.magcache import Ratios
from cachekit.schemas.named import NamedConfig


class DiffusersMethodConfig(NamedConfig):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name_field = "strategy"
    strategy: str
    budget: Share | None = Field(
        default=None,
        description="In a study, the share of block executions to spend at most: the method's knob is tuned for it "
        "on the calibration cells, by the search cachekit's strategies get.",
    )


class DiffusersFirstBlockCache(DiffusersMethodConfig):
    """diffusers' FirstBlockCacheConfig."""

    strategy: Literal["diffusers.first_block_cache"] = "diffusers.first_block_cache"
    threshold: float = Field(default=0.05, ge=0)


class DiffusersMagCache(DiffusersMethodConfig):
    """diffusers' MagCacheConfig; `mag_ratios` or a cachekit MagCache `preset`."""

    strategy: Literal["diffusers.mag_cache"] = "diffusers.mag_cache"
    threshold: float = Field(default=0.06, ge=0)
    max_skip_steps: int = Field(default=3, ge=0)
    retention_ratio: float = Field(default=0.2, ge=0, lt=1)
    num_inference_steps: int | None = Field(default=None, ge=1, description="None: the study's steps.")
    mag_ratios: Ratios | None = None
    preset: str | None = Field(default=None, description="A cachekit MagCache preset: its ratios.")

    @model_validator(mode="after")
    def _ratios_from_one_place(self) -> DiffusersMagCache:
        if (self.mag_ratios is None) == (self.preset is None):
            raise ValueError("give mag_ratios or preset (one of them)")
        return self


class DiffusersTaylorSeer(DiffusersMethodConfig):
    """diffusers' TaylorSeerCacheConfig (factors stored in `taylor_factors_dtype`)."""

    strategy: Literal["diffusers.taylorseer_cache"] = "diffusers.taylorseer_cache"
    cache_interval: int = Field(default=5, ge=1)
    disable_cache_before_step: int = Field(default=3, ge=1)
    disable_cache_after_step: int | None = Field(default=None, ge=1)
    max_order: int = Field(default=1, ge=1)
    taylor_factors_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    cache_identifiers: list[str] | None = Field(default=None, description="Regexes of module names to forecast.")
    skip_predict_identifiers: list[str] | None = None
    use_lite_mode: bool = False


class DiffusersSeaCache(DiffusersMethodConfig):
    """diffusers' SeaCacheConfig; the latent it filters is the adapter's, so it runs on every adapter."""

    strategy: Literal["diffusers.sea_cache"] = "diffusers.sea_cache"
    threshold: float = Field(default=0.25, ge=0)
    residual_order: Literal[0, 1] = 1
    retention_steps: int = Field(default=1, ge=0)
    cache_end_steps: int = Field(default=1, ge=0)
    max_consecutive_cached: int = Field(default=2, ge=0)
    power_exp: float = Field(default=3.0, gt=0)


class DiffusersPAB(DiffusersMethodConfig):
    """diffusers' PyramidAttentionBroadcastConfig (None: that kind is not broadcast)."""

    strategy: Literal["diffusers.pyramid_attention_broadcast"] = "diffusers.pyramid_attention_broadcast"
    spatial_attention_block_skip_range: int | None = Field(default=2, ge=1)
    temporal_attention_block_skip_range: int | None = Field(default=None, ge=1)
    cross_attention_block_skip_range: int | None = Field(default=None, ge=1)
    spatial_attention_timestep_skip_range: tuple[float, float] = (100, 800)
    temporal_attention_timestep_skip_range: tuple[float, float] = (100, 800)
    cross_attention_timestep_skip_range: tuple[float, float] = (100, 800)


DIFFUSERS_METHODS: dict[str, type[DiffusersMethodConfig]] = {
    config.registered_name(): config
    for config in (DiffusersFirstBlockCache, DiffusersMagCache, DiffusersTaylorSeer, DiffusersSeaCache, DiffusersPAB)
}
