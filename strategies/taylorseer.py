"""TaylorSeer (arXiv 2503.06923): compute on a fixed schedule and forecast everything between
with a Taylor expansion around the last computed values (the estimator does the forecasting).

Step s computes iff s < D (warm-up), or (s - D - 1) mod N == 0, or s >= A (cool-down): with
D = 3, N = 5 the steps 0, 1, 2, 4, 9, 14, ... compute, as in diffusers' TaylorSeerCacheConfig.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cachekit.adapter import ModuleSite, Place
from cachekit.hookspecs import hookimpl
from cachekit.schemas.taylorseer import TaylorSeerConfig
from cachekit.strategy import ExampleConfigs, Knob, Signals, Step, Strategy

_LEVELS = {
    "span": frozenset({Place.SPAN}),
    "attention": frozenset({Place.ATTENTION}),
    "modules": frozenset({Place.ATTENTION, Place.MLP}),
}


class TaylorSeerStrategy(Strategy[TaylorSeerConfig]):
    config_class = TaylorSeerConfig
    knob = Knob("interval", integer=True)
    rank_consistent = True  # decides from the step and cachekit.signals alone

    @classmethod
    def example_configs(cls) -> ExampleConfigs:
        return ExampleConfigs(
            never_reuses=TaylorSeerConfig(warmup_steps=1000, level="modules"),
            reuses=TaylorSeerConfig(interval=2, warmup_steps=2, level="modules"),
        )

    def required_points(self) -> frozenset[str]:
        return _LEVELS[self.config.level]

    def computes(self, step: Step) -> bool:
        config = self.config
        return (
            step.index < config.warmup_steps
            or (step.index - config.warmup_steps - 1) % config.interval == 0
            or (config.cooldown_from is not None and step.index >= config.cooldown_from)
        )

    def decision_key(self, site: ModuleSite) -> str:
        return "step"  # the schedule decides every module alike

    def decide_span(self, step: Step, signals: Signals, state: Any) -> bool:
        return self.computes(step)

    def decide_module(self, step: Step, site: ModuleSite, state: Any) -> bool:
        return self.computes(step)


@hookimpl
def cachekit_register_strategies(register: Callable[[type[Strategy[Any]]], None]) -> None:
    register(TaylorSeerStrategy)
