"""FasterCache's CFG-Cache rule (arXiv 2410.19355) for the difference between CFG branches.

The difference recorded when both branches were computed is split once into a low-frequency band
(a disc of radius min(height, width) // 5 around the centre of its shifted 2-D spectrum over height
and width) and the rest. Each skipped call multiplies each band by its alpha where the timestep is
inside the band's window, and keeps the product (consecutive skips compound, as diffusers'
FasterCacheConfig does), and gets the bands' sum. The split is linear, so this equals FasterCache's
rebuilding of the unconditional spectrum from the conditional one plus the weighted band deltas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cachekit.errors import EstimatorError
from cachekit.estimator import Estimator
from cachekit.hookspecs import hookimpl
from cachekit.schemas.estimators import FasterCacheDifferenceConfig
from cachekit.strategy import Step


@dataclass
class _Bands:
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None
    dtype: torch.dtype | None = None


class FasterCacheEstimator(Estimator[FasterCacheDifferenceConfig]):
    config_class = FasterCacheDifferenceConfig
    predictions_only = True

    def new_state(self) -> _Bands:
        return _Bands()

    def record(self, state: _Bands, value: torch.Tensor, step: Step) -> None:
        if value.ndim < 4:
            raise EstimatorError(
                f"the fastercache estimator splits frequencies over a value's last two dimensions (height, width), "
                f"but got a value of shape {tuple(value.shape)}: it takes values laid out (batch, channels, [frames,] "
                "height, width): the difference between CFG branches' predictions on a model that predicts latents "
                "(Wan, CogVideoX, Latte, ...), not tokens (Flux, LTX, Qwen-Image); there, give the branch level "
                "another estimator (branches={'estimator': 'copy'})"
            )
        exact = value.float()
        state.low = low_frequencies(exact)
        state.high = exact - state.low
        state.dtype = value.dtype

    def estimate(self, state: _Bands, step: Step) -> torch.Tensor:
        assert state.low is not None and state.high is not None and state.dtype is not None
        config = self.config
        if _inside(config.low_window, step.timestep):
            state.low = state.low * config.alpha_low
        if _inside(config.high_window, step.timestep):
            state.high = state.high * config.alpha_high
        return (state.low + state.high).to(state.dtype)

    def kept(self, state: _Bands) -> list[torch.Tensor]:
        return [band for band in (state.low, state.high) if band is not None]

    def slots(self) -> int:
        return 2


def _inside(window: tuple[float, float], timestep: float) -> bool:
    return window[0] < timestep < window[1]


def low_frequencies(value: torch.Tensor) -> torch.Tensor:
    """The part of `value` whose shifted 2-D spectrum over its last two dimensions lies in the disc of
    radius min(height, width) // 5 around the centre."""
    height, width = value.shape[-2:]
    radius = min(height, width) // 5
    rows = torch.arange(height, device=value.device).unsqueeze(1) - height // 2
    columns = torch.arange(width, device=value.device).unsqueeze(0) - width // 2
    disc = rows**2 + columns**2 <= radius**2
    spectrum = torch.fft.fftshift(torch.fft.fft2(value), dim=(-2, -1))
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum * disc, dim=(-2, -1))).real


@hookimpl
def cachekit_register_estimators(register: Callable[[type[Estimator[Any]]], None]) -> None:
    register(FasterCacheEstimator)
