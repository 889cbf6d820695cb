"""A plugin strategy with its own config model: compute even steps and the last one."""

from typing import Literal

from pydantic import Field

from cachekit import Strategy, hookimpl
from cachekit.adapter import Place
from cachekit.schemas import StrategyConfig


class AlternateConfig(StrategyConfig):
    strategy: Literal["alternate"] = "alternate"
    offset: int = Field(default=0, ge=0, le=1)


class AlternateStrategy(Strategy[AlternateConfig]):
    config_class = AlternateConfig
    requires = frozenset({Place.SPAN})
    needs_num_steps = True

    def new_state(self):
        return {"decisions": 0}

    def decide_span(self, step, signals, state):
        state["decisions"] += 1
        return step.index == 0 or step.is_last or (step.index + self.config.offset) % 2 == 0


@hookimpl
def cachekit_register_strategies(register):
    register(AlternateStrategy)
