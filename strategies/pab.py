"""Pyramid Attention Broadcast (arXiv 2408.12588): attention outputs change little in the middle
of denoising, spatial attention the most and cross attention the least, so each kind is
recomputed every N-th call of its module and its output reused in between, inside a timestep
window. Reuse is per module and per CFG branch: one branch never receives another's output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cachekit.adapter import Adapter, ModuleSite, Point, SiteKind
from cachekit.hookspecs import hookimpl
from cachekit.policy import CachePolicy, ExampleConfigs, Step
from cachekit.schemas import PAB_DEFAULTS, PAB_FALLBACK, PAB_GATED, Broadcast, MLPBroadcast, PABConfig


class PABPolicy(CachePolicy[PABConfig]):
    config_class = PABConfig
    rank_consistent = True  # decides from the step and cachekit.signals alone

    def __init__(self, config: PABConfig) -> None:
        super().__init__(config)
        self.settings: dict[SiteKind, Broadcast] = {}
        self.mlp_blocks = frozenset(config.mlp.blocks) if config.mlp else frozenset()
        self.gated = config.reuse == "gated"

    @classmethod
    def example_configs(cls) -> ExampleConfigs:
        everywhere = (0.0, 1000.0)
        once = Broadcast(range=1)
        return ExampleConfigs(
            never_reuses=PABConfig(spatial=once, temporal=once, cross=once),
            reuses=PABConfig(mlp=MLPBroadcast(range=2, blocks=(0,), window=everywhere)),
        )

    def required_points(self) -> frozenset[Point]:
        points = {Point.STEP, Point.ATTENTION}
        if self.config.mlp is not None:
            points.add(Point.MLP)
        return frozenset(points)

    def attach(self, adapter: Adapter) -> dict[str, Any]:
        defaults = PAB_DEFAULTS.get(adapter.name, {})
        for kind in ("spatial", "temporal", "cross"):
            chosen = getattr(self.config, kind) or defaults.get(kind) or PAB_FALLBACK[kind]
            self.settings[SiteKind(kind)] = chosen
        if self.config.mlp is not None:
            self.settings[SiteKind.MLP] = self.config.mlp
            blocks = len(adapter.blocks())
            if max(self.mlp_blocks) >= blocks:
                raise ValueError(f"mlp.blocks {sorted(self.mlp_blocks)} out of range: the model has {blocks} blocks")
        defaults_from = adapter.name if adapter.name in PAB_DEFAULTS else "fallback"
        self.gated = (self.config.reuse or ("gated" if adapter.name in PAB_GATED else "output")) == "gated"
        sites = [*adapter.attention_sites(), *(adapter.mlp_sites() if adapter.provides(Point.MLP) else [])]
        ungated = self.gated and not any(site.gated for site in sites)
        return {
            **(
                {"note": f"the {adapter.name!r} adapter declares no gates: every site reuses its output"}
                if ungated
                else {}
            ),
            "defaults": defaults_from,
            "reuse": "gated" if self.gated else "output",
            # A setting for a kind the model lacks applies to nothing; say so.
            "absent": {kind.value: reason for kind, reason in adapter.missing_attention.items()},
            **{kind.value: setting.model_dump() for kind, setting in self.settings.items()},
        }

    def _broadcast(self, site: ModuleSite) -> Broadcast | None:
        """The setting that applies at `site`; None for the MLPs of blocks not chosen."""
        if site.kind is SiteKind.MLP and site.block not in self.mlp_blocks:
            return None
        return self.settings[site.kind]

    def reuses_gated(self, site: ModuleSite) -> bool:
        return self.gated

    def may_reuse(self, site: ModuleSite) -> bool:
        setting = self._broadcast(site)
        return setting is not None and setting.range > 1

    def new_state(self) -> dict[str, int]:
        """Calls so far of each module in this branch."""
        return {}

    def decide_module(self, step: Step, site: ModuleSite, state: dict[str, int]) -> bool:
        calls = state.get(site.name, 0)
        state[site.name] = calls + 1
        setting = self._broadcast(site)
        if setting is None:
            return True
        low, high = setting.window
        return calls % setting.range == 0 or not low < step.timestep < high


@hookimpl
def cachekit_register_strategies(register: Callable[[type[CachePolicy[Any]]], None]) -> None:
    register(PABPolicy)
