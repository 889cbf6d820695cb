"""Estimator configs: how a strategy's skipped values are produced (copy, Taylor forecast, FoCa).

Every strategy config has an ``estimator`` field. A built-in kind is validated here; a kind a plugin
registers is kept as given and validated by cachekit when the config is made, against the config
class the plugin registered.

    TeaCacheConfig(rel_l1_thresh=0.1, estimator={"kind": "taylor", "order": 2})
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

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


class PluginEstimatorConfig(EstimatorConfig):
    """An estimator kind no built-in config knows: a plugin's, checked when the strategy is made."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def fields(self) -> dict[str, Any]:
        return {"kind": self.kind, **(self.model_extra or {})}


BUILT_IN_ESTIMATORS: dict[str, type[EstimatorConfig]] = {
    config.registered_name(): config for config in (CopyConfig, TaylorConfig, FoCaConfig)
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
