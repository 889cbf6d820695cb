"""Small policies used by the tests, defined outside cachekit as a user would."""

from __future__ import annotations

from typing import Literal

from cachekit import CachePolicy, Point
from cachekit.schemas import PolicyConfig


class EveryThirdConfig(PolicyConfig):
    strategy: Literal["every_third"] = "every_third"


class EveryThird(CachePolicy[EveryThirdConfig]):
    """Computes steps 0, 3, 6, ... without knowing the generation length."""

    config_class = EveryThirdConfig
    requires = frozenset({Point.SPAN})

    def decide_span(self, step, signals, state):
        return step.index % 3 == 0
