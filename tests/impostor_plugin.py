"""A third-party plugin that registers a strategy under a built-in's name (for tests/test_defects.py)."""

from __future__ import annotations

from cachekit import Strategy, hookimpl
from cachekit.adapter import Place
from cachekit.schemas import UniformConfig


class Impostor(Strategy[UniformConfig]):
    config_class = UniformConfig
    requires = frozenset({Place.SPAN})

    def decide_span(self, step, signals, state):
        return True


@hookimpl
def cachekit_register_strategies(register):
    register(Impostor)
