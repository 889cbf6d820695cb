"""Framing a transformer call: the generation, step and CFG branch it belongs to, the state it runs
with, and the strategy's answers checked on the way.

The step comes from the pipeline (see `cachekit.steps`): the call hook is a stateful diffusers hook,
so a pipeline's `cache_context` reaches it, and diffusers' reset of stateful hooks at the end of a
pipeline call ends the generation.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

from cachekit.adapter import Adapter, CallSignal, OutputSite, Streams
from cachekit.errors import (
    AlreadyAttachedError,
    ConcurrentUseError,
    EstimatorError,
    RankDivergenceError,
    StepCountError,
    StrategyError,
    UnsupportedModelError,
)
from cachekit.estimator import Kept
from cachekit.runtime.branching import KEPT, SKIPPED, BranchLevel
from cachekit.runtime.placement import context_parallel_group
from cachekit.signals import meta_reads_answered, read, reduced_over
from cachekit.stats import BranchStats, CacheStats, GenerationStats, tensor_bytes
from cachekit.steps import StepTracker
from cachekit.strategy import Step, Strategy

#: What a branch keeps, by site: ("span", segment) for the span's residuals, (module, run) for a module's
#: outputs; under the batched branch level, with the batch half it holds (`branching.SKIPPED`, `KEPT`).
Key = tuple[Any, ...]


@dataclass
class Branch:
    """What one CFG branch carries through a generation."""

    stats: BranchStats
    state: Any  # the strategy's
    kept: dict[Key, Kept] = field(default_factory=dict)  # the estimator's, by site
    segments: set[int] = field(default_factory=set)  # the span's segments when it last computed
    gates: dict[Key, torch.Tensor] = field(default_factory=dict)  # a re-gated site's gate when computed


@dataclass
class Call:
    """What the runtime knows during one transformer call."""

    step: Step
    branch: Branch
    group: Any = None  # the process group the ranks' decisions must agree over
    device: torch.device | None = None  # where the call's latent lives
    signals: dict[str, Any] = field(default_factory=dict)  # the signals seen in this call, by name
    inputs: dict[int, Streams] = field(default_factory=dict)  # segment -> its streams on entry
    head_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # head segment -> first stream on entry
    head_residual: list[torch.Tensor] = field(default_factory=list)
    compute: bool = True  # the span's decision
    decisions: dict[Any, bool] = field(default_factory=dict)  # a module decision key -> its decision in this call
    module_runs: dict[str, int] = field(default_factory=dict)  # site -> runs so far in this call
    computed_modules: int = 0
    undo: Any = None  # what `Frames.end` restores if the call raises
    produced: bool = False  # the branch level produces this call's output: no block runs
    #: Under the batched branch level, the batch halves the call runs: both, or the kept one alone.
    halves: tuple[int, ...] = ()
    batch: int = 0  # then: the batch the call was given (both halves)


class Frames:
    """Turns the calls of one transformer into `Call`s, and keeps each branch's state through a
    generation (dropped when the next one starts)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        strategy: Strategy[Any],
        tracker: StepTracker,
        stats: CacheStats,
        process_group: Any = None,
        call_signals: Mapping[str, CallSignal] | None = None,
        wants_output: bool = False,
        module_sites: bool = False,
        branching: BranchLevel | None = None,
        trajectory: frozenset[str] = frozenset(),
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.strategy = strategy
        self.tracker = tracker  # shared by the experts of one pipeline
        self.stats = stats
        self.process_group = process_group  # None: the model's context-parallel group, if any
        self.call_signals = dict(call_signals or {})  # read from the call's arguments, before it runs
        self.wants_output = wants_output
        self.module_sites = module_sites
        self.branching = branching
        self.trajectory = trajectory  # what of the trajectory the estimators read
        self.call: Call | None = None
        self._seen: dict[str, Any] = {}  # the call signals of the call about to run, whole
        self._generation = -1  # the tracker's generation the branches belong to
        self.joined_late = False  # this transformer's first call of the generation came after step 0
        self._branches: dict[int, Branch] = {}
        self._reduction: Any = None  # the signal group's context of the running call
        self._busy = threading.Lock()  # held during a transformer call
        self._owner: int | None = None  # the thread running the current generation
        self.tuned_steps: int | None = None  # the step count a budget's setting was tuned at

    def group(self) -> Any:
        """The process group decisions must agree over: the one given to `apply`, else the model's
        context-parallel group under diffusers' context parallelism, else None (no collectives)."""
        return self.process_group if self.process_group is not None else context_parallel_group(self.model)

    @torch.compiler.disable
    def begin(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], context: Any) -> Call:
        if not self._busy.acquire(blocking=False):
            raise ConcurrentUseError(self._concurrent("while another thread's call of it was running"))
        try:
            return self._begin(args, kwargs, context)
        except BaseException:
            self._busy.release()
            raise

    def _begin(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], context: Any) -> Call:
        adapter, tracker = self.adapter, self.tracker
        sample = adapter.latent_input(args, kwargs)
        if sample.is_meta and not meta_reads_answered():
            raise UnsupportedModelError(
                f"{type(self.model).__name__} was called on the meta device, whose tensors hold no values: a strategy "
                "decides from values and keeps them; run the model on a real device, or remove the strategy "
                "(handle.remove()) for a pass that needs only shapes"
            )
        enabled = getattr(self.model, "_cache_config", None)
        if enabled is not None:
            raise AlreadyAttachedError(
                f"{type(self.model).__name__} had diffusers' {type(enabled).__name__} enabled (enable_cache) after "
                "cachekit.apply: two caches would skip on top of each other; call its disable_cache() to keep "
                "cachekit's, or handle.remove() to keep diffusers'"
            )
        timestep = functools.partial(adapter.step_of, args, kwargs)  # read only where the pipeline gives no step
        thread = threading.get_ident()
        if self._owner not in (None, thread) and not tracker.opens_generation(timestep, sample, context):
            raise ConcurrentUseError(self._concurrent("in the middle of a generation another thread runs"))
        before = (tracker.snapshot(), self._generation, self.joined_late)
        step = tracker.advance(timestep, sample, context)
        if self.trajectory:
            try:
                step = self._with_trajectory(step, args, kwargs)
            except BaseException:
                tracker.restore(before[0])  # the call counts for nothing
                raise
        if tracker.generation != self._generation:
            if self.tuned_steps is not None and tracker.num_steps not in (None, self.tuned_steps):
                raise StepCountError(
                    f"this generation has {tracker.num_steps} steps, but the setting for the strategy's budget was "
                    f"tuned at {self.tuned_steps}: a budget's setting holds at its step count only; tune it at "
                    f"{tracker.num_steps} (`cachekit tune ... --budget ... --save`), or generate {self.tuned_steps} "
                    "steps"
                )
            self._owner = thread
            self._generation = tracker.generation
            self.joined_late = step.index > 0
            self._branches.clear()
            self.stats.generations.append(GenerationStats(tracker.num_steps))
            if self.branching is not None:
                self.branching.start()
        branching = self.branching
        if branching is not None:
            step = dataclasses.replace(step, alone=branching.alone(step))
        branch = self._branches.get(step.branch)
        if branch is None:
            stats = self.stats.last.branch(step.branch)
            branch = self._branches[step.branch] = Branch(stats, self.strategy.new_state())
            name = getattr(context, "name", None)
            if name is not None:
                stats.context = name
        undo = (*before, branch.stats.mark())
        branch.stats.calls += 1
        call = Call(step, branch, group=self.group(), device=sample.device, undo=undo)
        if branching is not None:
            call.produced = branching.produces(step)
            branch.stats.produced += call.produced
            if branching.batched:
                call.halves = (KEPT,) if step.alone else (SKIPPED, KEPT)
                call.batch = sample.shape[0]
        self._reduction = reduced_over(call.group)
        self._reduction.__enter__()
        if self._seen:
            call.signals.update(self._seen)
            self._seen = {}
        self.call = call
        return call

    @torch.compiler.disable
    def end(self, call: Call, output: Any) -> None:
        """The call is over (`output` None: it raised)."""
        self.call = None
        if output is None:
            self._undo(call)
        try:
            if self.module_sites:
                call.branch.stats.module_schedule.append(call.computed_modules)
            if self.wants_output and output is not None:
                self.strategy.observe(call.step, self.adapter.prediction(output), call.branch.state)
            call.branch.stats.strategy_bytes = tensor_bytes(call.branch.state)
        finally:
            if self._reduction is not None:
                self._reduction.__exit__(None, None, None)
                self._reduction = None
            self._busy.release()

    def _with_trajectory(self, step: Step, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Step:
        """`step` with the latent the estimators read; a step without the noise levels they read is
        refused (they come from a pipeline's flow-matching scheduler)."""
        if "sigma" in self.trajectory and step.sigma is None:
            raise EstimatorError(
                f"the estimator of strategy {self.strategy.name()!r} reads each step's noise level (sigma) and the "
                "next step's, which come from the pipeline's flow-matching scheduler, but "
                f"{type(self.model).__name__} was called without one (a bare transformer, or a scheduler without "
                "sigmas): apply the strategy to the pipeline, or choose an estimator that reads only the cached "
                "values (copy, taylor, dmd, ...)"
            )
        if "latent" in self.trajectory:
            step = dataclasses.replace(step, latent=self.adapter.latent(args, kwargs))
        return step

    def _undo(self, call: Call) -> None:
        """A call that raised (out of memory, an interrupt) counts for nothing: the step tracker
        and the counts go back to before it, and its branch starts over with nothing kept (its
        state may be half updated), so the same step can be called again."""
        tracker_state, generation, joined_late = call.undo[:3]
        if self._generation != generation:  # it opened a generation: the retry opens it again
            self.stats.generations.pop()
            self._generation, self.joined_late = generation, joined_late
        else:
            call.branch.stats.rewind(call.undo[3])
            self._branches.pop(call.step.branch, None)
            self.joined_late = True  # the branch's next call computes whatever it would reuse
        self.tracker.restore(tracker_state)

    def branches(self) -> list[Branch]:
        """The branches of the current generation so far."""
        return list(self._branches.values())

    @torch.compiler.disable
    def see_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Before the call (and any diffusers hook that splits its arguments): its call signals."""
        if self.adapter.latent_input(args, kwargs).is_meta and not meta_reads_answered():
            return  # `begin` names the mistake
        self._seen = {name: source.read(args, kwargs) for name, source in self.call_signals.items()}

    def generation_ended(self) -> None:
        """The pipeline call is over: the next transformer call opens a new generation."""
        if self.call is None:
            self.tracker.start()

    def _concurrent(self, when: str) -> str:
        return (
            f"{type(self.model).__name__} was called from a second thread {when}: a strategy follows one generation "
            "at a time; give each thread its own transformer (or apply the strategy per thread)"
        )

    def decision(self, call: Call, decision: Any, method: str) -> bool:
        """A strategy's answer as a bool; anything else (a forgotten return, a tensor) is its mistake.
        Under context parallelism a strategy not declared rank-consistent has its answer compared
        across the ranks: they must all compute or all skip, or each raises instead of hanging."""
        if not isinstance(decision, bool | np.bool_):
            raise StrategyError(
                f"{type(self.strategy).__name__}.{method} returned {decision!r} ({type(decision).__name__}); "
                "a decision must be True (compute) or False (skip)"
            )
        if call.group is not None and not self.strategy.rank_consistent and not agree(bool(decision), call):
            raise RankDivergenceError(
                f"{type(self.strategy).__name__}.{method}: the ranks of the context-parallel group decided "
                f"differently at step {call.step.index} (branch {call.step.branch}); compute its signals with "
                "cachekit.signals (reduced over the group) and set rank_consistent = True"
            )
        return bool(decision)

    def compute_first(self, what: str, step: Step) -> bool:
        """A reuse with nothing stored: the second expert of a pipeline starts mid-generation with
        nothing of its own, so it computes; anywhere else the strategy is at fault."""
        if self.joined_late:
            return True
        raise StrategyError(
            f"strategy {self.strategy.name()!r} chose to reuse {what} at step {step.index} "
            f"(branch {step.branch}) before computing it once in this generation"
        )


def agree(decision: bool, call: Call) -> bool:
    """Whether every rank of the call's group made `decision`: one collective on the call's device
    (NCCL takes device tensors only), one read."""
    votes = torch.full((2,), float(decision), device=call.device)
    votes[1].neg_()
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX, group=call.group)
    highest, lowest_negated = read(votes[0], votes[1])
    return highest == -lowest_negated


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class CallHook(ModelHook):
    """On the transformer: frames each call. Stateful, so that diffusers hands it the pipeline's
    cache context and tells it when a pipeline call is over."""

    _is_stateful = True

    def __init__(self, frames: Frames) -> None:
        super().__init__()
        self.frames = frames
        self.context = StateManager(_NoState)  # diffusers sets the pipeline's cache context on it

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        frames = self.frames
        call = frames.begin(args, kwargs, self.context._context)
        forward, branching = self.fn_ref.original_forward, frames.branching
        try:
            output = forward(*args, **kwargs) if branching is None else branching.run(call, forward, args, kwargs)
        except BaseException:
            frames.end(call, None)
            raise
        frames.end(call, output)
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.frames.generation_ended()
        return module


class OutputSignalHook(ModelHook):
    """On a module whose output is a signal (the timestep embedder): hands its output (or items of
    it) to the call's signals."""

    def __init__(self, frames: Frames, sites: list[tuple[str, OutputSite]]) -> None:
        super().__init__()
        self.frames = frames
        self.sites = sites

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        call = self.frames.call
        if call is not None:
            for name, site in self.sites:
                call.signals[name] = site.read(output)
        return output
