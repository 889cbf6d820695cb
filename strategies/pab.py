"""Pyramid Attention Broadcast (arXiv 2408.12588): attention outputs change little in the middle
of denoising, spatial attention the most and cross attention the least, so each kind is
recomputed every N-th call of its module and its output reused in between, inside a timestep
window. MLP outputs may be broadcast too, every N-th call or from listed timesteps (VideoSys's
rule). Reuse is per module and per CFG branch: one branch never receives another's output.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from cachekit.adapter import Adapter, ModuleSite, Place, SiteKind
from cachekit.hookspecs import hookimpl
from cachekit.schemas.pab import (
    PAB_DEFAULTS,
    PAB_FALLBACK,
    PAB_GATED,
    PAB_MLP_DEFAULTS,
    Broadcast,
    MLPBroadcast,
    MLPBroadcastAt,
    PABConfig,
)
from cachekit.strategy import ExampleConfigs, Step, Strategy

#: Key of a branch's state once a listed MLP timestep was reached in the generation.
LISTED_TIMESTEP_SEEN = "listed timestep seen"


class PABStrategy(Strategy[PABConfig]):
    config_class = PABConfig
    rank_consistent = True  # decides from the step and cachekit.signals alone

    def __init__(self, config: PABConfig) -> None:
        super().__init__(config)
        self.settings: dict[SiteKind, Broadcast] = {}
        self.mlp: MLPBroadcast | MLPBroadcastAt | None = config.mlp or None  # unset: settled at attach
        self.mlp_blocks = frozenset(self.mlp.blocks) if self.mlp else frozenset()
        self.gated = config.reuse == "gated"
        self.warned = False  # that no listed MLP timestep was reached

    @classmethod
    def example_configs(cls) -> ExampleConfigs:
        everywhere = (0.0, 1000.0)
        once = Broadcast(range=1)
        return ExampleConfigs(
            never_reuses=PABConfig(spatial=once, temporal=once, cross=once, mlp=False),
            reuses=PABConfig(mlp=MLPBroadcast(range=2, blocks=(0,), window=everywhere)),
        )

    def required_points(self) -> frozenset[str]:
        points = {Place.ATTENTION}
        if self.mlp is not None:
            points.add(Place.MLP)
        return frozenset(points)

    def attach(self, adapter: Adapter) -> dict[str, Any]:
        defaults = PAB_DEFAULTS.get(adapter.name, {})
        for kind in ("spatial", "temporal", "cross"):
            chosen = getattr(self.config, kind) or defaults.get(kind) or PAB_FALLBACK[kind]
            self.settings[SiteKind(kind)] = chosen
        blocks = len(adapter.blocks())
        published = PAB_MLP_DEFAULTS.get(adapter.name)
        if self.config.mlp is None and published is not None and adapter.provides(Place.MLP):
            self.mlp = published  # on the blocks this model has
            self.mlp_blocks = frozenset(block for block in published.blocks if block < blocks)
        if self.mlp is not None and max(self.mlp_blocks) >= blocks:
            raise ValueError(f"mlp.blocks {sorted(self.mlp_blocks)} out of range: the model has {blocks} blocks")
        defaults_from = adapter.name if adapter.name in PAB_DEFAULTS else "fallback"
        self.gated = (self.config.reuse or ("gated" if adapter.name in PAB_GATED else "output")) == "gated"
        sites = [*adapter.attention_sites(), *(adapter.mlp_sites() if adapter.provides(Place.MLP) else [])]
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
            "mlp": None if self.mlp is None else {**self.mlp.model_dump(), "blocks": sorted(self.mlp_blocks)},
        }

    def reuses_gated(self, site: ModuleSite) -> bool:
        return self.gated

    def may_reuse(self, site: ModuleSite) -> bool:
        if site.kind is not SiteKind.MLP:
            return self.settings[site.kind].range > 1
        if self.mlp is None or site.block not in self.mlp_blocks:
            return False
        return isinstance(self.mlp, MLPBroadcastAt) or self.mlp.range > 1

    def decision_key(self, site: ModuleSite) -> tuple[SiteKind, bool]:
        """Every module of a kind is called once per call and follows one rule: one decision per
        kind (for MLPs, apart for those the broadcast covers)."""
        return site.kind, site.kind is SiteKind.MLP and site.block in self.mlp_blocks

    def new_state(self) -> dict[Any, int]:
        """Calls so far of each kind of module in this branch (and, under `MLPBroadcastAt`, the
        calls the MLPs have left to reuse)."""
        return {}

    def decide_module(self, step: Step, site: ModuleSite, state: dict[Any, int]) -> bool:
        key = self.decision_key(site)
        calls = state.get(key, 0)
        state[key] = calls + 1
        setting: Broadcast
        if site.kind is SiteKind.MLP:
            if self.mlp is None or site.block not in self.mlp_blocks:
                return True
            if isinstance(self.mlp, MLPBroadcastAt):
                return self._computes_from_timesteps(self.mlp, step, "MLP reuses left", state)
            setting = self.mlp
        else:
            setting = self.settings[site.kind]
        low, high = setting.window
        return calls % setting.range == 0 or not low < step.timestep < high

    def _computes_from_timesteps(self, setting: MLPBroadcastAt, step: Step, left: str, state: dict[Any, int]) -> bool:
        """Compute at a listed timestep and keep the output for the next `skip` calls."""
        if any(abs(step.timestep - listed) < 0.5 for listed in setting.timesteps):
            state[left], state[LISTED_TIMESTEP_SEEN] = setting.skip, 1
            return True
        if step.is_last and LISTED_TIMESTEP_SEEN not in state and not self.warned:
            self.warned = True
            warnings.warn(
                f"PAB's MLP broadcast never applied: none of its timesteps {setting.timesteps} was among this "
                f"generation's {step.num_steps} (VideoSys's rule matches them exactly); list timesteps the scheduler "
                "gives, or set mlp=False",
                UserWarning,
                stacklevel=2,
            )
        if state.get(left, 0) > 0:
            state[left] -= 1
            return False
        return True


@hookimpl
def cachekit_register_strategies(register: Callable[[type[Strategy[Any]]], None]) -> None:
    register(PABStrategy)
