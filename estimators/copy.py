"""Copy: a skipped call gets the last computed value (what TeaCache, FBCache, MagCache and PAB do)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cachekit.estimator import Estimator
from cachekit.hookspecs import hookimpl
from cachekit.schemas.estimators import CopyConfig
from cachekit.strategy import Step


@dataclass
class _Last:
    value: torch.Tensor | None = None


class CopyEstimator(Estimator[CopyConfig]):
    config_class = CopyConfig

    def new_state(self) -> _Last:
        return _Last()

    def record(self, state: _Last, value: torch.Tensor, step: Step) -> None:
        state.value = value

    def estimate(self, state: _Last, step: Step) -> torch.Tensor:
        assert state.value is not None
        return state.value

    def kept(self, state: _Last) -> list[torch.Tensor]:
        return [] if state.value is None else [state.value]

    def slots(self) -> int:
        return 1


@hookimpl
def cachekit_register_estimators(register: Callable[[type[Estimator[Any]]], None]) -> None:
    register(CopyEstimator)
