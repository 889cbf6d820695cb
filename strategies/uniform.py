"""Uniform-interval reuse: compute every N-th step, reuse the span residual in between.

The TeaCache paper's static baseline; FORA and Δ-DiT cache at a finer grain on the same schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cachekit.adapter import Place
from cachekit.hookspecs import hookimpl
from cachekit.schemas.configs import UniformConfig
from cachekit.strategy import ExampleConfigs, Knob, Signals, Step, Strategy


class UniformStrategy(Strategy[UniformConfig]):
    config_class = UniformConfig
    knob = Knob("interval", integer=True)
    rank_consistent = True  # decides from the step and cachekit.signals alone
    requires = frozenset({Place.SPAN})
    needs_num_steps = True

    @classmethod
    def example_configs(cls) -> ExampleConfigs:
        return ExampleConfigs(never_reuses=UniformConfig(interval=1), reuses=UniformConfig(interval=2))

    def decide_span(self, step: Step, signals: Signals, state: Any) -> bool:
        return step.index < self.config.warmup or step.is_last or step.index % self.config.interval == 0


@hookimpl
def cachekit_register_strategies(register: Callable[[type[Strategy[Any]]], None]) -> None:
    register(UniformStrategy)
