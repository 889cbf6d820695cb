"""The whole plugin contract. A plugin is a module (or object) listed under the entry-point group
``cachekit`` that implements any of these hooks; the built-in strategies, estimators, adapters and
metrics are plugins of exactly this kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from cachekit.adapter import Adapter
    from cachekit.estimator import Estimator
    from cachekit.metric import Metric
    from cachekit.strategy import Strategy

hookspec = pluggy.HookspecMarker("cachekit")
hookimpl = pluggy.HookimplMarker("cachekit")


@hookspec
def cachekit_register_strategies(register: Callable[[type[Strategy]], None]) -> None:
    """Call ``register(StrategyClass)`` for each strategy this plugin provides."""


@hookspec
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    """Call ``register(AdapterClass)`` for each model family this plugin supports."""


@hookspec
def cachekit_register_estimators(register: Callable[[type[Estimator]], None]) -> None:
    """Call ``register(EstimatorClass)`` for each estimator (how skipped values are produced)."""


@hookspec
def cachekit_register_metrics(register: Callable[[type[Metric]], None]) -> None:
    """Call ``register(MetricClass)`` for each quality metric studies can compute."""
