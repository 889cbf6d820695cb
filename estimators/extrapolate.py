"""Extrapolate (FasterCache's attention rule): a skipped call gets the newest value plus `weight`
times its change since the value before, and that estimate becomes the newest value, so a run of
skips keeps extrapolating from what it estimated (as diffusers' FasterCache keeps its cache)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cachekit.estimator import Estimator
from cachekit.hookspecs import hookimpl
from cachekit.schemas.estimators import ExtrapolateConfig
from cachekit.strategy import Step


@dataclass
class _LastTwo:
    before: torch.Tensor | None = None
    newest: torch.Tensor | None = None


class ExtrapolateEstimator(Estimator[ExtrapolateConfig]):
    config_class = ExtrapolateConfig

    def new_state(self) -> _LastTwo:
        return _LastTwo()

    def record(self, state: _LastTwo, value: torch.Tensor, step: Step) -> None:
        state.before = value if state.newest is None else state.newest  # a first value has not changed yet
        state.newest = value

    def estimate(self, state: _LastTwo, step: Step) -> torch.Tensor:
        assert state.newest is not None and state.before is not None
        estimate = state.newest + (state.newest - state.before) * self.config.weight
        state.before, state.newest = state.newest, estimate
        return estimate

    def kept(self, state: _LastTwo) -> list[torch.Tensor]:
        return [tensor for tensor in (state.before, state.newest) if tensor is not None]

    def slots(self) -> int:
        return 2


@hookimpl
def cachekit_register_estimators(register: Callable[[type[Estimator[Any]]], None]) -> None:
    register(ExtrapolateEstimator)
