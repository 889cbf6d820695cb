"""EasyCache (arXiv 2507.02860): while the model runs, measure how fast its output changes for a
given change of its input, and skip the block stack while the output's predicted change stays small.

Per CFG branch: at each computed step, once two exist, the transformation rate
k = mean|v_t - v_c| / mean|x_t - x_c| (v the output, x the noisy latent, c the previous computed
step). At other steps the predicted change k * mean|x_t - x_t-1| / mean|v_c| accumulates; the
stack is skipped while the sum stays below the threshold, and computes (the sum reset) otherwise.
The first `warmup_steps` and the last step compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cachekit.adapter import LATENT, OUTPUT, Place
from cachekit.hookspecs import hookimpl
from cachekit.schemas.easycache import EasyCacheConfig
from cachekit.signals import mean_abs_on_device, read
from cachekit.strategy import ExampleConfigs, Knob, Signals, Step, Strategy

#: Keeps the ratios finite when a latent or an output does not change at all.
TINY = 1e-12


@dataclass
class _BranchState:
    latent: torch.Tensor | None = None  # x of this call, until the call ends
    previous_latent: torch.Tensor | None = None  # x_t-1
    computing: bool = True  # whether this call runs the span
    computed: tuple[torch.Tensor, torch.Tensor] | None = None  # (x_c, v_c) at the last computed step
    output_scale: torch.Tensor | None = None  # mean |v_c|
    rate: torch.Tensor | None = None  # k
    accumulated: torch.Tensor | float = 0.0


class EasyStrategy(Strategy[EasyCacheConfig]):
    config_class = EasyCacheConfig
    knob = Knob("threshold")
    rank_consistent = True  # decides from the step and cachekit.signals alone
    requires = frozenset({Place.SPAN, LATENT, OUTPUT})

    def __init__(self, config: EasyCacheConfig) -> None:
        super().__init__(config)
        self.needs_num_steps = config.compute_last_step

    @classmethod
    def example_configs(cls) -> ExampleConfigs:
        return ExampleConfigs(
            never_reuses=EasyCacheConfig(warmup_steps=1000),
            reuses=EasyCacheConfig(warmup_steps=2, threshold=1000.0),
        )

    def new_state(self) -> _BranchState:
        return _BranchState()

    def decide_span(self, step: Step, signals: Signals, state: _BranchState) -> bool:
        """The rate, the output's scale and the latent's move stay on the device; their
        combination is read once. A sum that is not finite (a NaN latent) computes."""
        assert signals.latent is not None
        state.latent = signals.latent
        forced = step.index < self.config.warmup_steps or (self.config.compute_last_step and step.is_last)
        if forced or state.rate is None or state.output_scale is None or state.previous_latent is None:
            state.computing = True
        else:
            moved = mean_abs_on_device(signals.latent - state.previous_latent)
            state.accumulated = state.accumulated + state.rate * moved / state.output_scale.clamp_min(TINY)
            (accumulated,) = read(state.accumulated)
            state.computing = not accumulated < self.config.threshold
        if state.computing:
            state.accumulated = 0.0
        return state.computing

    def observe(self, step: Step, output: torch.Tensor, state: _BranchState) -> None:
        latent, state.previous_latent = state.latent, state.latent
        if not state.computing or latent is None:
            return
        if state.computed is not None:
            last_latent, last_output = state.computed
            moved = mean_abs_on_device(latent - last_latent).clamp_min(TINY)
            state.rate = mean_abs_on_device(output - last_output) / moved
        state.computed = (latent, output)
        state.output_scale = mean_abs_on_device(output)


@hookimpl
def cachekit_register_strategies(register: Callable[[type[Strategy[Any]]], None]) -> None:
    register(EasyStrategy)
