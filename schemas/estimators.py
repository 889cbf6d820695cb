"""Estimator configs: how a strategy's skipped values are produced (copy, Taylor forecast, FoCa, DMD,
FasterCache's rules).

Every strategy config has an ``estimator`` field. A built-in kind is validated here; a kind a plugin
registers is kept as given and validated by cachekit when the config is made, against the config
class the plugin registered.

    TeaCacheConfig(rel_l1_thresh=0.1, estimator={"kind": "taylor", "order": 2})
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from cachekit.schemas.named import NamedConfig


class EstimatorConfig(NamedConfig):
    """Fields every estimator shares."""

    name_field = "kind"
    kind: str
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None,
        description="The dtype the kept values are stored in (None: the model's). 'bfloat16' halves what a "
        "float32 model keeps; 'float32' keeps a bf16 model's forecasts exact.",
    )


class CopyConfig(EstimatorConfig):
    """A skipped call gets the last computed value, unchanged."""

    kind: Literal["copy"] = "copy"


class TaylorConfig(EstimatorConfig):
    """TaylorSeer (arXiv 2503.06923): a Taylor expansion around the last computed value, its
    derivatives estimated by finite differences over the last `order` + 1 computed calls."""

    kind: Literal["taylor"] = "taylor"
    order: int = Field(default=1, ge=1, le=4, description="Highest derivative of the expansion (1 to 4).")
    spacing: Literal["timestep", "step"] = Field(
        default="timestep",
        description="The coordinate the differences are divided by: the real timestep distance (as the paper "
        "writes it), or the step count (as diffusers' TaylorSeerCacheConfig computes it).",
    )


class FoCaConfig(EstimatorConfig):
    """FoCa (arXiv 2508.16211): a BDF2 predictor with a Heun corrector over the computed and the
    forecast values; nothing to tune."""

    kind: Literal["foca"] = "foca"


class DMDConfig(EstimatorConfig):
    """Dynamic Mode Decomposition: the last `window` computed values, evenly spaced, fit a linear
    propagator whose eigenmodes (damped or oscillating exponentials) are advanced to the skipped
    step; an exponential basis where Taylor's is polynomial. Until 4 evenly spaced values exist, a
    first-order Taylor forecast over the step count."""

    kind: Literal["dmd"] = "dmd"
    window: int = Field(default=6, ge=4, le=64, description="Computed values kept and fitted (the newest).")
    rank: int = Field(
        default=0, ge=0, description="Modes kept; 0: every mode above 1e-4 of the strongest (noise is dropped)."
    )
    ridge: float = Field(default=1e-8, ge=0, description="Added to the singular values before inverting them.")

    @model_validator(mode="after")
    def _rank_within_window(self) -> DMDConfig:
        if self.rank > self.window - 1:
            raise ValueError(
                f"rank {self.rank} needs a window of at least {self.rank + 1} values (a window of {self.window} "
                f"fits at most {self.window - 1} modes, one per pair of consecutive values); raise window, lower "
                "rank, or give rank 0 (automatic)"
            )
        return self


class FasterCacheDifferenceConfig(EstimatorConfig):
    """FasterCache's CFG-Cache rule (arXiv 2410.19355) for the difference between CFG branches: the
    last recorded difference split by a 2-D FFT over height and width into a low-frequency disc
    (radius min(height, width) // 5 around the centre) and the rest, each band multiplied on every
    skipped call by its alpha while the timestep is inside its window (so consecutive skips
    compound, as diffusers' FasterCacheConfig does). For values laid out (batch, channels, [frames,]
    height, width): a model's prediction, not tokens."""

    kind: Literal["fastercache"] = "fastercache"
    alpha_low: float = Field(default=1.1, gt=0, description="Weight of the low band per skipped call in low_window.")
    alpha_high: float = Field(default=1.1, gt=0, description="Weight of the high band per skipped call in high_window.")
    low_window: tuple[float, float] = Field(default=(99.0, 901.0), description="(low, high) timesteps, exclusive.")
    high_window: tuple[float, float] = Field(default=(-1.0, 301.0), description="(low, high) timesteps, exclusive.")


class ExtrapolateConfig(EstimatorConfig):
    """FasterCache's attention rule: the newest value plus `weight` times its change since the one
    before; the estimate then counts as the newest value, so consecutive skips keep extrapolating."""

    kind: Literal["extrapolate"] = "extrapolate"
    weight: float = Field(default=0.5, ge=0, le=10, description="How much of the last change is added again.")


class MeanCacheConfig(EstimatorConfig):
    """MeanCache (arXiv 2601.19961): a skipped call gets the average of the value over its step,
    v_last - JVP (next sigma - sigma), rather than the last value; the JVP (the value's rate of
    change along the trajectory) comes from the last `span` values handed out (computed or
    estimated) and their noise levels. Needs the pipeline's flow-matching scheduler."""

    kind: Literal["meancache"] = "meancache"
    span: int = Field(default=2, ge=1, le=8, description="Values the JVP is measured over (1: no correction, a copy).")


class PluginEstimatorConfig(EstimatorConfig):
    """An estimator kind no built-in config knows: a plugin's, checked when the strategy is made."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def fields(self) -> dict[str, Any]:
        return {"kind": self.kind, **(self.model_extra or {})}


BUILT_IN_ESTIMATORS: dict[str, type[EstimatorConfig]] = {
    config.registered_name(): config
    for config in (
        CopyConfig,
        TaylorConfig,
        FoCaConfig,
        DMDConfig,
        FasterCacheDifferenceConfig,
        ExtrapolateConfig,
        MeanCacheConfig,
    )
}


def parse_estimator(value: Any) -> Any:
    """A config from a kind name or a dict with a ``kind`` key; built-in kinds are validated now."""
    if isinstance(value, str):
        value = {"kind": value}
    if isinstance(value, dict):
        if "kind" not in value:
            raise ValueError(f"an estimator needs a 'kind'; built-in kinds: {', '.join(BUILT_IN_ESTIMATORS)}")
        config = BUILT_IN_ESTIMATORS.get(value["kind"], PluginEstimatorConfig)
        return config.model_validate(value)
    if not isinstance(value, EstimatorConfig):
        raise ValueError(
            f"an estimator is a kind name, a dict with a 'kind' or an estimator config, got {value!r}; built-in "
            f"kinds: {', '.join(BUILT_IN_ESTIMATORS)} (plugins add others: `cachekit list`)"
        )
    return value
