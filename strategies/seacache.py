"""SeaCache (arXiv 2602.18993): decide from the noisy latent filtered towards its clean content.

The filter weighs each spatio-temporal frequency f by the Wiener gain of a clean signal with a
power-law spectrum 1/|f|^p against the noise level sigma: g = s P / (s^2 P + sigma^2), s = 1 - sigma,
per axis, the product normalised to mean 1. Per CFG branch, the filtered latent's relative L1
change since the previous step (mean over the batch) accumulates; the block stack is skipped while
the sum stays below the threshold. The first `retention_steps` and last `cache_end_steps` steps
compute, as does a step after `max_consecutive_cached` skips in a row; a step that does not follow
the previous one starts over. This is the rule diffusers' SeaCacheConfig implements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cachekit.adapter import LATENT, Place
from cachekit.hookspecs import hookimpl
from cachekit.schemas.seacache import SeaCacheConfig
from cachekit.signals import read, relative_l1_on_device
from cachekit.strategy import ExampleConfigs, Knob, Signals, Step, Strategy

#: Keeps the divisions of the filter and the distance finite.
EPS = 1e-16


def sea_filter(latent: torch.Tensor, sigma: float, power_exp: float) -> torch.Tensor:
    """One sample's latent (channels, frames, height, width), filtered over frames, height and width."""
    sigma = min(max(sigma, 1e-6), 1 - 1e-6)
    signal = 1.0 - sigma
    values = latent.movedim(0, -1).float()  # frames, height, width, channels
    gain = torch.ones((), device=latent.device)
    for axis in range(3):
        power = 1.0 / (torch.fft.fftfreq(values.shape[axis], device=latent.device).abs() ** power_exp + EPS)
        axis_gain = signal * power / (signal**2 * power + sigma**2 + EPS)
        shape = [1] * values.ndim
        shape[axis] = -1
        gain = gain * axis_gain.reshape(shape)
    mean = gain.mean()
    gain = torch.where(torch.isfinite(mean) & (mean > 0), gain / mean, gain)  # on the device: no sync
    filtered = torch.fft.ifftn(torch.fft.fftn(values, dim=(0, 1, 2)) * gain, dim=(0, 1, 2)).real
    return filtered.movedim(-1, 0).to(latent.dtype)


@dataclass
class _BranchState:
    indicator: list[torch.Tensor] | None = None  # the filtered latent of the previous step, per sample
    index: int | None = None  # the previous step
    accumulated: float = 0.0
    consecutive: int = 0


class SeaStrategy(Strategy[SeaCacheConfig]):
    config_class = SeaCacheConfig
    knob = Knob("threshold")
    rank_consistent = True  # decides from the step and cachekit.signals alone
    requires = frozenset({Place.SPAN, LATENT})
    needs_num_steps = True

    @classmethod
    def example_configs(cls) -> ExampleConfigs:
        return ExampleConfigs(
            never_reuses=SeaCacheConfig(threshold=0.0),
            reuses=SeaCacheConfig(threshold=1000.0),
        )

    def new_state(self) -> _BranchState:
        return _BranchState()

    def decide_span(self, step: Step, signals: Signals, state: _BranchState) -> bool:
        assert signals.latent is not None and step.num_steps is not None
        config = self.config
        if state.index is not None and step.index != state.index + 1:  # not the next step: start over
            state.indicator, state.accumulated, state.consecutive = None, 0.0, 0
        indicator = [sea_filter(sample, step.timestep / 1000, config.power_exp) for sample in signals.latent]
        previous, state.indicator, state.index = state.indicator, indicator, step.index
        forced = (
            step.index < config.retention_steps
            or step.index >= step.num_steps - config.cache_end_steps
            or previous is None
            or (config.max_consecutive_cached > 0 and state.consecutive >= config.max_consecutive_cached)
        )
        if not forced:
            assert previous is not None
            pairs = zip(indicator, previous, strict=True)
            change = torch.stack([relative_l1_on_device(now, before, EPS) for now, before in pairs]).sum()
            (mean_change,) = read(change / len(indicator))  # every sample's change, read once
            state.accumulated += mean_change
        if forced or not state.accumulated < config.threshold:
            state.accumulated, state.consecutive = 0.0, 0
            return True
        state.consecutive += 1
        return False


@hookimpl
def cachekit_register_strategies(register: Callable[[type[Strategy[Any]]], None]) -> None:
    register(SeaStrategy)
