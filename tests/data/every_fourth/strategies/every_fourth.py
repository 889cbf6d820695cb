"""A built-in method's strategy, as docs/plugins.md shows it."""

from cachekit.adapter import Place
from cachekit.hookspecs import hookimpl
from cachekit.schemas.every_fourth import EveryFourthConfig
from cachekit.strategy import ExampleConfigs, Knob, Strategy


class EveryFourth(Strategy[EveryFourthConfig]):
    config_class = EveryFourthConfig
    knob = Knob("offset", integer=True)  # what `cachekit tune` searches
    requires = frozenset({Place.SPAN})
    rank_consistent = True  # decides from the step alone: every rank alike

    @classmethod
    def example_configs(cls):  # one that never reuses, one that does: the conformance matrix
        return ExampleConfigs(never_reuses=EveryFourthConfig(offset=0), reuses=EveryFourthConfig(offset=1))

    def decide_span(self, step, signals, state):
        return self.config.offset == 0 or step.index % 4 == self.config.offset - 1 or step.index == 0


@hookimpl
def cachekit_register_strategies(register):
    register(EveryFourth)
