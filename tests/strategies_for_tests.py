"""Small policies used by the tests, defined outside cachekit as a user would."""

from __future__ import annotations

from typing import ClassVar, Literal

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


class NeverComputesConfig(PolicyConfig):
    strategy: Literal["never_computes"] = "never_computes"


class NeverComputes(CachePolicy[NeverComputesConfig]):
    """A broken policy: asks to reuse the span before anything was computed."""

    config_class = NeverComputesConfig
    requires = frozenset({Point.SPAN})

    def decide_span(self, step, signals, state):
        return False


class NeverComputesAttentionConfig(PolicyConfig):
    strategy: Literal["never_computes_attention"] = "never_computes_attention"


class NeverComputesAttention(CachePolicy[NeverComputesAttentionConfig]):
    """A broken policy: asks to reuse attention before anything was computed."""

    config_class = NeverComputesAttentionConfig
    requires = frozenset({Point.ATTENTION})

    def decide_module(self, step, site, state):
        return False


class RecordSignalsConfig(PolicyConfig):
    strategy: Literal["record_signals"] = "record_signals"


class RecordSignals(CachePolicy[RecordSignalsConfig]):
    """Always computes, and keeps the probe it was handed at each call."""

    config_class = RecordSignalsConfig
    requires = frozenset({Point.SPAN, Point.PROBE})
    seen: ClassVar[list] = []

    def decide_span(self, step, signals, state):
        RecordSignals.seen.append((step.index, step.branch, signals.probe))
        return True
