"""First-Block Cache (ParaAttention) and DBCache (cache-dit): the first blocks always run, and
their residual tells whether the rest of the stack would change much.

Per call and CFG branch: the first Fn blocks run; d = relative L1 change of their residual since
the last call that computed the span; the blocks between the first Fn and the last Bn are skipped
while d <= threshold (their residual comes from the estimator), and the last Bn blocks always run.
The stored residual of the first blocks is updated only on computed calls. Optional caps, in
DBCache's order: warm-up steps compute; a branch that skipped `max_cached_steps` steps, or
`max_consecutive_cached` in a row, computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cachekit.adapter import Place
from cachekit.hookspecs import hookimpl
from cachekit.schemas.fbcache import FBCacheConfig
from cachekit.signals import relative_l1
from cachekit.strategy import ExampleConfigs, Knob, Signals, Step, Strategy


@dataclass
class _BranchState:
    reference: tuple[torch.Tensor, ...] | None = None  # the first blocks' residual at the last compute
    cached: int = 0
    consecutive: int = 0


class FBStrategy(Strategy[FBCacheConfig]):
    config_class = FBCacheConfig
    knob = Knob("threshold")
    rank_consistent = True  # decides from the step and cachekit.signals alone
    requires = frozenset({Place.SPAN})

    def __init__(self, config: FBCacheConfig) -> None:
        super().__init__(config)
        self.needs_num_steps = config.compute_last_step

    @classmethod
    def example_configs(cls) -> ExampleConfigs:
        return ExampleConfigs(
            never_reuses=FBCacheConfig(threshold=0.0, warmup_steps=1000),
            reuses=FBCacheConfig(threshold=1000.0),
        )

    def always_computed(self) -> tuple[int, int]:
        return (self.config.first_blocks, self.config.last_blocks)

    def new_state(self) -> _BranchState:
        return _BranchState()

    def decide_span(self, step: Step, signals: Signals, state: _BranchState) -> bool:
        assert signals.head_residual is not None
        config = self.config
        compute = (
            step.index < config.warmup_steps
            or (config.compute_last_step and step.is_last)
            or (config.max_cached_steps is not None and state.cached >= config.max_cached_steps)
            or (config.max_consecutive_cached is not None and state.consecutive >= config.max_consecutive_cached)
            or state.reference is None
            or relative_l1(signals.head_residual, state.reference) > config.threshold
        )
        if compute:
            state.reference = signals.head_residual
            state.consecutive = 0
        else:
            state.cached += 1
            state.consecutive += 1
        return compute


@hookimpl
def cachekit_register_strategies(register: Callable[[type[Strategy[Any]]], None]) -> None:
    register(FBStrategy)
