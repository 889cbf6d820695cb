"""A static schedule: the steps to compute are a fixed mask, searched offline for a budget.

Decides from the step index alone, so it costs no host sync and every rank decides alike. The
search (`cachekit.schedule`) finds the mask that minimises the error of skipping on calibration
prompts, with the config's estimator producing the skipped steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cachekit.adapter import Place
from cachekit.errors import StepCountError
from cachekit.hookspecs import hookimpl
from cachekit.schemas.schedule import ScheduleConfig
from cachekit.strategy import ExampleConfigs, Knob, Signals, Step, Strategy


class ScheduleStrategy(Strategy[ScheduleConfig]):
    config_class = ScheduleConfig
    knob = Knob("mask", mask=True)
    rank_consistent = True
    requires = frozenset({Place.SPAN})
    needs_num_steps = True

    def __init__(self, config: ScheduleConfig) -> None:
        super().__init__(config)
        self._masks: dict[int, tuple[bool, ...]] = {}

    @classmethod
    def example_configs(cls) -> ExampleConfigs:
        return ExampleConfigs(
            never_reuses=ScheduleConfig(mask="1", resample=True), reuses=ScheduleConfig(mask="1101", resample=True)
        )

    def decide_span(self, step: Step, signals: Signals, state: Any) -> bool:
        assert step.num_steps is not None
        mask = self._masks.get(step.num_steps)
        if mask is None:
            mask = self.config.mask_at(step.num_steps)
            if mask is None:
                raise StepCountError(
                    f"the schedule's mask has {len(self.config.mask or '')} steps but this generation has "
                    f"{step.num_steps}: search one at {step.num_steps} steps (`cachekit tune SPEC --strategy "
                    "schedule --budget B --save FILE`), or set resample=True to stretch it"
                )
            self._masks[step.num_steps] = mask
        return mask[step.index]


@hookimpl
def cachekit_register_strategies(register: Callable[[type[Strategy[Any]]], None]) -> None:
    register(ScheduleStrategy)
