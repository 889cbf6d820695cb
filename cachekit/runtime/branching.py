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
from typing import Any

import torch

from cachekit.adapter import Adapter
from cachekit.errors import BranchLevelError
from cachekit.estimator import Estimator, Kept
from cachekit.schemas.branches import BranchLevelConfig
from cachekit.strategy import Step

#: A call's batch halves, in a batched-CFG call: the one the branch level may skip, the other.
SKIPPED, KEPT = 0, 1


class BranchLevel:
    """What the branch level keeps through one generation: the difference between the branches (an
    estimator state) and, with CFG as two calls, the first branch's output of the current step."""

    def __init__(
        self, config: BranchLevelConfig, estimator: Estimator[Any], adapter: Adapter, storage: torch.dtype | None
    ) -> None:
        self.config = config
        self.estimator = estimator
        self.adapter = adapter
        self.storage = storage
        self.batched = config.cfg == "batched"
        self.start()

    def start(self) -> None:
        """A generation begins: nothing recorded."""
        self.difference: Kept | None = None
        self._first: tuple[int, Any] | None = None  # (step, the first branch's output there)
        self._paired = False  # a second call came in a step of this generation

    def skips(self, step: Step) -> bool:
        """Whether the second branch is produced, not computed, at `step`."""
        config = self.config
        if self.difference is None or step.index < config.warmup or step.index % config.interval == 0:
            return False
        return config.window is None or config.window[0] < step.timestep < config.window[1]

    def alone(self, step: Step) -> bool:
        """Whether the call at `step` runs without its CFG partner (which it then stands for)."""
        return step.branch == 0 and self.skips(step)

    def produces(self, step: Step) -> bool:
        """Whether the call at `step` is the second of a two-call step that is skipped: no block runs."""
        first = self._first
        return (
            not self.batched and step.branch == 1 and first is not None and first[0] == step.index and self.skips(step)
        )

    def run(
        self, step: Step, produced: bool, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        """The call's output: computed, or (`produced`: the second branch of a skipped step) produced."""
        if self.batched:
            return self._batched(step, forward, args, kwargs)
        if step.branch == 0:
            self._check_cfg(step)
            output = forward(*args, **kwargs)
            self._first = (step.index, output)
            return output
        first = self._first
        if step.branch != 1 or first is None or first[0] != step.index:
            return forward(*args, **kwargs)  # a third call of a step, or one whose partner raised
        self._paired = True
        prediction = self.adapter.prediction(first[1])
        if produced:
            return _with_prediction(first[1], self._produced(prediction, step))
        output = forward(*args, **kwargs)
        self._record(self.adapter.prediction(output), prediction, step)
        return output

    def _batched(
        self, step: Step, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        batch = self.adapter.latent_input(args, kwargs).shape[0]
        if batch % 2:
            raise BranchLevelError(
                f"the branch level with cfg='batched' takes a call whose batch holds both CFG branches (the "
                f"unconditional half first), but this call's latent has a batch of {batch}: run the pipeline with "
                "CFG (guidance_scale > 1), or set cfg='calls' for a pipeline that calls the transformer once per branch"
            )
        if not step.alone:
            output = forward(*args, **kwargs)
            skipped, kept = self.adapter.prediction(output).chunk(2)
            self._record(skipped, kept, step)
            return output
        output = forward(*_kept_half(args, batch), **_kept_half(kwargs, batch))
        kept = self.adapter.prediction(output)
        return _with_prediction(output, torch.cat([self._produced(kept, step), kept]))

    def _record(self, skipped: torch.Tensor, kept: torch.Tensor, step: Step) -> None:
        if self.config.interval == 1:
            return  # never skips: nothing to keep
        if self.difference is None:
            self.difference = Kept(self.estimator, self.storage)
        self.difference.record(skipped.float() - kept.float(), step)

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
