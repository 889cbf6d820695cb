"""The Estimator contract: how the value of a skipped call is produced; the policy says when.

Wherever a policy may skip work (a segment of the residual span, an attention or MLP module), the
runtime keeps per CFG branch one estimator state for each tensor of that site's value: every
computed value goes in with its step, and a skipped call gets the estimator's value for its step.
A policy never forecasts, and an estimator never decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Generic, TypeVar

import torch

from cachekit.policy import Step
from cachekit.schemas.estimators import EstimatorConfig

ConfigT = TypeVar("ConfigT", bound=EstimatorConfig)


class Estimator(Generic[ConfigT]):
    """Base class of every estimator.

    Subclasses set `config_class` and implement `record` and `estimate` on the state `new_state`
    returns; that state belongs to one tensor of one site in one branch, and holds only what the
    estimator needs (a copy keeps one tensor; a Taylor forecast of order k keeps k + 1).
    """

    config_class: ClassVar[type[EstimatorConfig]]

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @classmethod
    def name(cls) -> str:
        return cls.config_class.kind_name()

    def new_state(self) -> Any:
        """State for one tensor of one site in one branch, before anything was computed."""
        raise NotImplementedError

    def record(self, state: Any, value: torch.Tensor, step: Step) -> None:
        """`value` was computed at `step`."""
        raise NotImplementedError

    def estimate(self, state: Any, step: Step) -> torch.Tensor:
        """The value for a call skipped at `step` (something was recorded before)."""
        raise NotImplementedError

    def kept(self, state: Any) -> Iterable[torch.Tensor]:
        """The tensors `state` holds, for the memory report."""
        raise NotImplementedError


class Kept:
    """What the runtime keeps for one site in one branch: an estimator state per tensor of the
    site's value (a tensor, or a tuple of tensors and Nones), and how to put the value together."""

    def __init__(self, estimator: Estimator[Any]) -> None:
        self.estimator = estimator
        self._layout: Any = None
        self._states: list[Any] = []

    def record(self, value: Any, step: Step) -> None:
        tensors, layout = _flatten(value)
        if layout != self._layout:  # a first value, or one shaped differently: start over
            self._layout = layout
            self._states = [self.estimator.new_state() for _ in tensors]
        for state, tensor in zip(self._states, tensors, strict=True):
            self.estimator.record(state, tensor, step)

    def estimate(self, step: Step) -> Any:
        return _unflatten([self.estimator.estimate(state, step) for state in self._states], self._layout)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in self._states for t in self.estimator.kept(state))


def _flatten(value: Any) -> tuple[list[torch.Tensor], Any]:
    """The tensors in `value` (a tensor, None, or a tuple/list of those, nested) and its layout:
    for a tensor its shape, for None None, for a tuple/list its type and its items' layouts."""
    if isinstance(value, torch.Tensor):
        return [value], ("tensor", value.shape, value.dtype)
    if value is None:
        return [], None
    if isinstance(value, tuple | list):
        tensors: list[torch.Tensor] = []
        layouts = []
        for item in value:
            found, layout = _flatten(item)
            tensors += found
            layouts.append(layout)
        return tensors, (type(value), tuple(layouts))
    raise TypeError(f"a cached value must be a tensor, None, or a tuple of those; got {type(value).__name__}")


def _unflatten(tensors: list[torch.Tensor], layout: Any) -> Any:
    remaining = iter(tensors)

    def build(part: Any) -> Any:
        if part is None:
            return None
        if part[0] == "tensor":
            return next(remaining)
        kind, items = part
        return kind(build(item) for item in items)

    return build(layout)
