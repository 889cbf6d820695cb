"""The Estimator contract: how the value of a skipped call is produced; the strategy says when.

Wherever a strategy may skip work (a segment of the residual span, an attention or MLP module), the
runtime keeps per CFG branch one estimator state for each tensor of that site's value: every
computed value goes in with its step, and a skipped call gets the estimator's value for its step.
A strategy never forecasts, and an estimator never decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Generic, TypeVar

import torch

from cachekit.errors import EstimatorError, shortened
from cachekit.schemas.estimators import EstimatorConfig
from cachekit.strategy import Step

ConfigT = TypeVar("ConfigT", bound=EstimatorConfig)


class Estimator(Generic[ConfigT]):
    """Base class of every estimator.

    Subclasses set `config_class` and implement `record` and `estimate` on the state `new_state`
    returns; that state belongs to one tensor of one site in one branch, and holds only what the
    estimator needs (a copy keeps one tensor; a Taylor forecast of order k keeps k + 1).
    """

    config_class: ClassVar[type[EstimatorConfig]]
    #: True for an estimator that takes only values laid out as a model's prediction, (batch,
    #: channels, [frames,] height, width): the branch level's difference, not a residual of tokens.
    predictions_only: ClassVar[bool] = False
    #: What of the trajectory `record` and `estimate` read from their `Step`: "sigma" (the step's
    #: noise level and the next one's, from the pipeline's scheduler) and "latent" (the call's noisy
    #: latent); the runtime sets only what is asked, and refuses a model or pipeline that cannot give it.
    trajectory: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @classmethod
    def name(cls) -> str:
        return cls.config_class.registered_name()

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

    def slots(self) -> int | None:
        """How many tensors of a value's size one state holds at most, so the memory a site will
        need is known from its first value; None: measured from `kept` after every record."""
        return None


class Kept:
    """What the runtime keeps for one site in one branch: an estimator state per tensor of the
    site's value (a tensor, or a tuple of tensors and Nones), how to put the value together, and
    the shapes of the inputs it was computed from.

    Values are stored in the `storage` dtype when one is given, and estimates come back in the
    value's own dtype. `nbytes` is what the states will hold at most (the estimator's `slots`
    times the value's size), counted once per layout; an estimator that declares no slots has
    its states measured after every record."""

    def __init__(self, estimator: Estimator[Any], storage: torch.dtype | None = None) -> None:
        self.estimator = estimator
        self.storage = storage
        self.inputs: tuple[Any, ...] = ()
        self.nbytes = 0
        self._slots = estimator.slots()
        self._layout: Any = None
        self._states: list[Any] = []
        self._recorded: list[tuple[torch.Size, torch.dtype, torch.device]] = []  # what the estimator was given

    def record(self, value: Any, step: Step, inputs: tuple[Any, ...] = ()) -> int:
        """Record a value computed at `step` from inputs of shapes `inputs`; returns how much
        `nbytes` changed."""
        tensors, layout = _flatten(value)
        before = self.nbytes
        self.inputs = inputs
        if self.storage is not None:
            tensors = [tensor.to(self.storage) for tensor in tensors]
        if layout != self._layout:  # a first value, or one shaped differently: start over
            self._layout = layout
            self._states = [self.estimator.new_state() for _ in tensors]
            self._recorded = [(tensor.shape, tensor.dtype, tensor.device) for tensor in tensors]
            if self._slots is not None:
                self.nbytes = self._slots * sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        for state, tensor in zip(self._states, tensors, strict=True):
            self.estimator.record(state, tensor, step)
        if self._slots is None:
            self.nbytes = sum(
                t.numel() * t.element_size() for state in self._states for t in self.estimator.kept(state)
            )
        return self.nbytes - before

    def estimate(self, step: Step) -> Any:
        estimates = [self.estimator.estimate(state, step) for state in self._states]
        for estimate, recorded in zip(estimates, self._recorded, strict=True):
            if not isinstance(estimate, torch.Tensor) or (estimate.shape, estimate.dtype, estimate.device) != recorded:
                raise EstimatorError(
                    f"estimator {self.estimator.name()!r} returned {_described(estimate)} at step {step.index} for a "
                    f"value recorded as {_described(recorded)}: an estimate must have the recorded shape, dtype and "
                    "device"
                )
        if self.storage is not None:
            estimates = [estimate.to(dtype) for estimate, dtype in zip(estimates, _dtypes(self._layout), strict=True)]
        return _unflatten(estimates, self._layout)


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = (value.shape, value.dtype, value.device)
    if isinstance(value, tuple):
        shape, dtype, device = value
        return f"a tensor of shape {tuple(shape)}, {str(dtype).removeprefix('torch.')}, on {device}"
    return shortened(f"{type(value).__name__} {value!r}", 120)


def _dtypes(layout: Any) -> list[torch.dtype]:
    """The dtype of each tensor in a layout, in order."""
    if layout is None:
        return []
    if layout[0] == "tensor":
        return [layout[2]]
    return [dtype for item in layout[1] for dtype in _dtypes(item)]


def _flatten(value: Any) -> tuple[list[torch.Tensor], Any]:
    """The tensors in `value` (a tensor, None, or a tuple/list of those, nested) and its layout:
    for a tensor its shape, dtype and device, for None None, for a tuple/list its type and its items' layouts."""
    if isinstance(value, torch.Tensor):
        return [value], ("tensor", value.shape, value.dtype, value.device)
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
