"""cachekit: training-free, strategy-pluggable caching for diffusion transformers.

    handle = cachekit.apply(pipe, cachekit.schemas.UniformConfig(interval=2))
    image = pipe(prompt).images[0]
    print(handle.stats.last)
    handle.remove()

Names are imported on first use, so `cachekit.schemas` loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "cachekit.adapter": [
        "Adapter",
        "BlockStreams",
        "CallSignal",
        "FirstBlockSignal",
        "ModuleSite",
        "OutputSite",
        "Place",
        "ResidualSpan",
        "SiteKind",
    ],
    "cachekit.declarative": ["DeclarativeAdapter", "declare_adapter"],
    "cachekit.errors": [
        "AlreadyAttachedError",
        "CachekitError",
        "HandleRemovedError",
        "MissingPointError",
        "PluginError",
        "StrategyError",
        "UnknownEstimatorError",
        "UnknownStrategyError",
        "UnsupportedModelError",
    ],
    "cachekit.estimator": ["Estimator"],
    "cachekit.metric": ["Metric", "MetricSkipped", "Sample"],
    "cachekit.handle": ["CacheHandle", "apply"],
    "cachekit.hookspecs": ["hookimpl"],
    "cachekit.example": ["ModelExample"],
    "cachekit.strategy": ["Strategy", "ExampleConfigs", "Knob", "Signals", "Step"],
    "cachekit.registry": [
        "get_estimator",
        "get_strategy",
        "list_adapters",
        "list_estimators",
        "list_metrics",
        "list_strategies",
        "make_config",
        "plugin_errors",
        "register_plugin",
        "resolve_adapter",
    ],
    "cachekit.stats": ["BranchStats", "CacheStats", "GenerationStats", "SiteCounts"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


_SUBMODULES = {
    "adapters",
    "calibrate",
    "estimators",
    "metrics",
    "registry",
    "schemas",
    "strategies",
    "study",
    "testbed",
    "testing",
    "tune",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"cachekit.{name}")
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'cachekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from cachekit.adapter import (
        Adapter,
        BlockStreams,
        CallSignal,
        FirstBlockSignal,
        ModuleSite,
        OutputSite,
        Place,
        ResidualSpan,
        SiteKind,
    )
    from cachekit.declarative import DeclarativeAdapter, declare_adapter
    from cachekit.errors import (
        AlreadyAttachedError,
        CachekitError,
        HandleRemovedError,
        MissingPointError,
        PluginError,
        StrategyError,
        UnknownEstimatorError,
        UnknownStrategyError,
        UnsupportedModelError,
    )
    from cachekit.estimator import Estimator
    from cachekit.example import ModelExample
    from cachekit.handle import CacheHandle, apply
    from cachekit.hookspecs import hookimpl
    from cachekit.metric import Metric, MetricSkipped, Sample
    from cachekit.registry import (
        get_estimator,
        get_strategy,
        list_adapters,
        list_estimators,
        list_metrics,
        list_strategies,
        make_config,
        plugin_errors,
        register_plugin,
        resolve_adapter,
    )
    from cachekit.stats import BranchStats, CacheStats, GenerationStats, SiteCounts
    from cachekit.strategy import ExampleConfigs, Knob, Signals, Step, Strategy
