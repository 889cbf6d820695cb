"""FasterCache (arXiv 2410.19355): the unconditional CFG branch is produced from the conditional one
on most steps (its CFG-Cache, the branch level with the `fastercache` difference), and on those
steps the conditional call's self-attention is computed only every `attention_interval`-th step,
extrapolated from its last two outputs in between. Decides from the step alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cachekit.adapter import ModuleSite, Place, SiteKind
from cachekit.hookspecs import hookimpl
from cachekit.schemas.fastercache import FASTERCACHE_BRANCHES, FasterCacheConfig
from cachekit.strategy import ExampleConfigs, Step, Strategy


class FasterCacheStrategy(Strategy[FasterCacheConfig]):
    config_class = FasterCacheConfig
    rank_consistent = True  # decides from the step alone
    requires = frozenset({Place.ATTENTION})
    reuses_alone_only = True  # under the branch level; without one, every call may reuse

    @classmethod
    def example_configs(cls) -> ExampleConfigs:
        return ExampleConfigs(
            never_reuses=FasterCacheConfig(
                attention_interval=1, branches=FASTERCACHE_BRANCHES.model_copy(update={"interval": 1})
            ),
            reuses=FasterCacheConfig(attention_window=(-1.0, 1001.0), branches=None),
        )

    def _rule(self, site: ModuleSite) -> tuple[int, tuple[float, float]] | None:
        """(interval, window) for a site that may be reused; None for one that never is."""
        config = self.config
        if site.kind is SiteKind.SPATIAL and config.attention_interval > 1:
            return config.attention_interval, config.attention_window
        if site.kind is SiteKind.TEMPORAL and config.temporal_interval not in (None, 1):
            return config.temporal_interval, config.temporal_window
        return None

    def may_reuse(self, site: ModuleSite) -> bool:
        return self._rule(site) is not None

    def decision_key(self, site: ModuleSite) -> SiteKind:
        return site.kind

    def decide_module(self, step: Step, site: ModuleSite, state: Any) -> bool:
        rule = self._rule(site)
        if rule is None or (self.config.branches is not None and not step.alone):
            return True
        interval, (low, high) = rule
        return step.index % interval == 0 or not low < step.timestep < high


@hookimpl
def cachekit_register_strategies(register: Callable[[type[Strategy[Any]]], None]) -> None:
    register(FasterCacheStrategy)
