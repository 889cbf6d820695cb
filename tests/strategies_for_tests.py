"""Small strategies used by the tests, defined outside cachekit as a user would."""

from __future__ import annotations

from typing import ClassVar, Literal

from cachekit import Strategy
from cachekit.adapter import PROBE, Place
from cachekit.schemas import StrategyConfig


class EveryThirdConfig(StrategyConfig):
    strategy: Literal["every_third"] = "every_third"


class EveryThird(Strategy[EveryThirdConfig]):
    """Computes steps 0, 3, 6, ... without knowing the generation length."""

    config_class = EveryThirdConfig
    requires = frozenset({Place.SPAN})

    def decide_span(self, step, signals, state):
        return step.index % 3 == 0


class NeverComputesConfig(StrategyConfig):
    strategy: Literal["never_computes"] = "never_computes"


class NeverComputes(Strategy[NeverComputesConfig]):
    """A broken strategy: asks to reuse the span before anything was computed."""

    config_class = NeverComputesConfig
    requires = frozenset({Place.SPAN})

    def decide_span(self, step, signals, state):
        return False


class NeverComputesAttentionConfig(StrategyConfig):
    strategy: Literal["never_computes_attention"] = "never_computes_attention"


class NeverComputesAttention(Strategy[NeverComputesAttentionConfig]):
    """A broken strategy: asks to reuse attention before anything was computed."""

    config_class = NeverComputesAttentionConfig
    requires = frozenset({Place.ATTENTION})

    def decide_module(self, step, site, state):
        return False


class RecordSignalsConfig(StrategyConfig):
    strategy: Literal["record_signals"] = "record_signals"


class RecordSignals(Strategy[RecordSignalsConfig]):
    """Always computes, and keeps the probe it was handed at each call."""

    config_class = RecordSignalsConfig
    requires = frozenset({Place.SPAN, PROBE})
    seen: ClassVar[list] = []

    def decide_span(self, step, signals, state):
        RecordSignals.seen.append((step.index, step.branch, signals.probe))
        return True
