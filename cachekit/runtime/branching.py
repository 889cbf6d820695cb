"""The branch level: with classifier-free guidance, the second CFG branch of a step is produced from
the first (its output this step plus the estimated difference between the branches) on the steps
the config skips, instead of computed.

The decision is a function of the step alone (its index and timestep), so every rank of a
context-parallel group makes it alike with no collective, and it is known when the step's first
call begins: that call runs `alone` (its `Step.alone`), which strategies such as FasterCache read.
With CFG as two calls, the second call of a skipped step runs no block; with one batched call
(unconditional half first), a skipped step runs the conditional half of the batch only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from cachekit.adapter import Adapter
from cachekit.errors import BranchLevelError
from cachekit.estimator import Estimator, Kept
from cachekit.schemas.branches import BranchLevelConfig
from cachekit.strategy import Step

if TYPE_CHECKING:
    from cachekit.runtime.framing import Call

#: A call's batch halves, in a batched-CFG call: the one the branch level may skip, the other.
SKIPPED, KEPT = 0, 1


class BranchLevel:
    """What the branch level keeps through one generation: the difference between the branches (an
    estimator state), how many steps the first branch computed, and, with CFG as two calls, the
    first branch's output of the current step.

    It counts the steps on which the first branch computed (ran its blocks): the second branch is
    computed on the `interval`-th of those, on the warmup steps and outside the window; on every
    other step it is produced, including the steps a step-level strategy skipped altogether, so a
    skipped step runs no block for any branch. Without a step-level strategy that skips, the count
    is the step index."""

    def __init__(
        self, config: BranchLevelConfig, estimator: Estimator[Any], adapter: Adapter, storage: torch.dtype | None
    ) -> None:
        self.config = config
        self.estimator = estimator
        self.adapter = adapter
        self.storage = storage
        self.batched = config.cfg == "batched"
        #: Told of every growth of what the difference keeps: (the call, bytes), to check the memory.
        self.grown: Callable[[Call, int], None] | None = None
        self.start()

    def start(self) -> None:
        """A generation begins: nothing recorded."""
        self.difference: Kept | None = None
        self._computed = 0  # steps so far on which the first branch computed
        #: (step, the first branch's output there, its place among the computed steps or None: reused)
        self._first: tuple[int, Any, int | None] | None = None
        self._paired = False  # a second call came in a step of this generation

    def _skips(self, step: Step, place: int) -> bool:
        """Whether the second branch is produced at `step`, whose first branch is the `place`-th to compute."""
        config = self.config
        if self.difference is None or step.index < config.warmup or place % config.interval == 0:
            return False
        return config.window is None or config.window[0] < step.timestep < config.window[1]

    def alone(self, step: Step) -> bool:
        """Whether the call at `step` runs without its CFG partner (which it then stands for), if it
        computes: known when the step begins."""
        return step.branch == 0 and self._skips(step, self._computed)

    def produces(self, step: Step) -> bool:
        """Whether the call at `step` is the second of a two-call step that is produced: no block runs."""
        first = self._first
        if self.batched or step.branch != 1 or first is None or first[0] != step.index or self.difference is None:
            return False
        place = first[2]
        return place is None or self._skips(step, place)

    def run(self, call: Call, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """The call's output: computed, or (`call.produced`: the second branch of a produced step) produced."""
        step = call.step
        if self.batched:
            return self._batched(call, forward, args, kwargs)
        if step.branch == 0:
            self._check_cfg(step)
            output = forward(*args, **kwargs)
            self._first = (step.index, output, self._count(call))
            return output
        first = self._first
        if step.branch != 1 or first is None or first[0] != step.index:
            return forward(*args, **kwargs)  # a third call of a step, or one whose partner raised
        self._paired = True
        prediction = self.adapter.prediction(first[1])
        if call.produced:
            return _with_prediction(first[1], self._produced(prediction, step))
        output = forward(*args, **kwargs)
        if call.compute and first[2] is not None:
            self._record(call, self.adapter.prediction(output), prediction)
        return output

    def _count(self, call: Call) -> int | None:
        """The first branch's call is over: its place among the computed steps (None: it reused)."""
        if not call.compute:
            return None
        self._computed += 1
        return self._computed - 1

    def _batched(
        self, call: Call, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        step = call.step
        batch = self.adapter.latent_input(args, kwargs).shape[0]
        if batch % 2:
            raise BranchLevelError(
                f"the branch level with cfg='batched' takes a call whose batch holds both CFG branches (the "
                f"unconditional half first), but this call's latent has a batch of {batch}: run the pipeline with "
                "CFG (guidance_scale > 1), or set cfg='calls' for a pipeline that calls the transformer once per branch"
            )
        if step.alone:
            output = forward(*_kept_half(args, batch), **_kept_half(kwargs, batch))
            kept = self.adapter.prediction(output)
        else:
            output = forward(*args, **kwargs)
            skipped, kept = self.adapter.prediction(output).chunk(2)
        place = self._count(call)
        if not step.alone and place is not None:
            self._record(call, skipped, kept)
            return output
        if self.difference is None:
            return output  # reused before a difference was recorded (a second expert joining late)
        return _with_prediction(output, torch.cat([self._produced(kept, step), kept]))

    def _record(self, call: Call, skipped: torch.Tensor, kept: torch.Tensor) -> None:
        if self.config.interval == 1:
            return  # never skips: nothing to keep
        if self.difference is None:
            self.difference = Kept(self.estimator, self.storage)
        grown = self.difference.record(skipped.float() - kept.float(), call.step)
        if grown and self.grown is not None:
            self.grown(call, grown)

    def kept_bytes(self) -> int:
        """What the difference keeps now, at most until the next record."""
        return self.difference.nbytes if self.difference is not None else 0

    def _produced(self, kept: torch.Tensor, step: Step) -> torch.Tensor:
        assert self.difference is not None
        return (kept.float() + self.difference.estimate(step)).to(kept.dtype)

    def _check_cfg(self, step: Step) -> None:
        """A two-call step begins: the previous one must have had a second call."""
        if not self._paired and self._first is not None:
            raise BranchLevelError(
                "the branch level (branches=...) produces the second CFG branch of a step from the first, but this "
                f"pipeline called the transformer once per step up to step {step.index}: it runs without CFG (a "
                "guidance-distilled model, or guidance_scale 1), or with CFG batched into one call (then set "
                "branches={'cfg': 'batched', ...}); remove `branches` for a pipeline without CFG"
            )


def _kept_half(values: Any, batch: int) -> Any:
    """The call's arguments (a tuple, or a dict of keyword arguments) with every tensor whose first
    dimension is the batch cut to its second (kept) half; what the arguments hold is left alone."""
    items = values.items() if isinstance(values, Mapping) else enumerate(values)
    cut = {key: kept_half(value, batch) for key, value in items}
    return cut if isinstance(values, Mapping) else tuple(cut.values())


def kept_half(value: Any, batch: int) -> Any:
    """`value`'s kept half, where it is a tensor whose first dimension is `batch`."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[batch // 2 :]
    return value


def _with_prediction(output: Any, prediction: torch.Tensor) -> Any:
    """A transformer's output like `output` (a tuple or an output object) carrying `prediction`."""
    if isinstance(output, torch.Tensor):
        return prediction
    if isinstance(output, tuple):
        return (prediction, *output[1:])
    produced = copy.copy(output)
    produced.sample = prediction
    return produced
