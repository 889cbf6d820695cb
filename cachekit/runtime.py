"""The plumbing between one transformer, one policy and its estimator.

Hooks (diffusers' `ModelHook`s, so they stack with diffusers' own offloading and casting hooks)
sit on the transformer, on the blocks of the residual span and on attention/MLP modules, only
where the policy asked. The transformer hook turns each call into a step and branch; the first
span block asks the policy; on reuse the span blocks pass their inputs through and the last block
of each segment adds the residual the estimator gives for it (the last computed one, for a copy);
a module site returns the estimator's output instead of running. Blocks the policy keeps computed
at the head and tail of the span always run. Nothing else changes: what computes runs its own
forward on the exact same arguments.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from cachekit.adapter import Adapter, BlockArgument, BlockStreams, ModuleSite, OutputSite, Point, Segment, Streams
from cachekit.errors import ConcurrentUseError, PolicyError, RankDivergenceError, UnsupportedModelError
from cachekit.estimator import Estimator, Kept
from cachekit.hooks import context_parallel_group, register_beneath_context_parallel, remove_keeping_the_rest
from cachekit.policy import CachePolicy, Signals, Step
from cachekit.signals import reduced_over
from cachekit.stats import BranchStats, CacheStats, GenerationStats
from cachekit.steps import StepTracker

Residual = tuple[torch.Tensor | None, ...]
#: What a branch keeps, by site: ("span", segment) for the span's residuals, (module, run) for a module's outputs.
Key = tuple[str, int]

HOOK_NAME = "cachekit"
GATE_HOOK_NAME = "cachekit-gate"  # on a block whose gated sites' values are re-gated


@dataclass
class _Call:
    """What the runtime knows during one transformer call."""

    step: Step
    stats: BranchStats
    state: Any
    kept: dict[Key, Kept]  # this branch's
    group: Any = None  # the process group the ranks' decisions must agree over
    latent: torch.Tensor | None = None
    probe: torch.Tensor | None = None
    inputs: dict[int, Streams] = field(default_factory=dict)  # segment -> its streams on entry
    head_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # head segment -> first stream on entry
    head_residual: list[torch.Tensor] = field(default_factory=list)
    compute: bool = True
    module_runs: dict[str, int] = field(default_factory=dict)  # site -> runs so far in this call
    module_decisions: dict[str, bool] = field(default_factory=dict)  # site -> decision of this call
    embeddings: dict[Point, Any] = field(default_factory=dict)  # embedding signals seen in this call


class Runtime:
    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        policy: CachePolicy[Any],
        estimator: Estimator[Any],
        tracker: StepTracker,
        process_group: Any = None,
    ):
        self.model = model
        self.process_group = process_group  # None: the model's context-parallel group, if any
        self.adapter = adapter
        self.policy = policy
        self.estimator = estimator
        self.tracker = tracker  # shared by the experts of one pipeline
        self._generation = -1  # the tracker's generation this runtime's state belongs to
        self._joined_late = False  # this transformer's first call of the generation came after step 0
        info = {**policy.attach(adapter), "estimator": policy.config.estimator.model_dump(mode="json")}
        self.stats = CacheStats(strategy=policy.name(), adapter=adapter.name, info=info)
        points = policy.required_points()  # after attach, which may settle what the policy reads
        for point in sorted(points):
            adapter.require(point, policy.name())
        self._wants_probe = Point.PROBE in points
        self._wants_latent = Point.LATENT in points
        self._wants_output = Point.OUTPUT in points
        reads = {Point.TIMESTEP_EMBEDDING: adapter.timestep_embedding}
        reads[Point.PROJECTED_TIMESTEP_EMBEDDING] = adapter.projected_timestep_embedding
        self._embeddings = {point: read() for point, read in reads.items() if point in points}
        self._places = _places(adapter, policy) if Point.SPAN in points else []
        self._block_arguments = {p: s for p, s in self._embeddings.items() if isinstance(s, BlockArgument)}
        if self._block_arguments and not self._places:
            raise PolicyError(
                f"strategy {policy.name()!r} reads {', '.join(self._block_arguments)} from the first block's arguments "
                f"on {type(model).__name__}, which it can only do when it also requires the span"
            )
        self._sites = [
            *(adapter.attention_sites() if Point.ATTENTION in points else []),
            *(adapter.mlp_sites() if Point.MLP in points else []),
        ]
        _each_once(model, [block for block, _ in self._places], "block")
        _each_once(model, [site.module for site in self._sites], "attention/MLP module")
        self._regated = {site.name for site in self._sites if site.gated and policy.reuses_gated(site)}
        self._gates: dict[int, dict[Key, torch.Tensor]] = {}  # branch -> gated site -> its gate when computed
        self._block_calls: dict[int, tuple[tuple[Any, ...], Mapping[str, Any]]] = {}  # block -> this call's args
        self._states: dict[int, Any] = {}
        self._kept: dict[int, dict[Key, Kept]] = {}  # branch -> site -> what the estimator keeps
        self._computed_segments: dict[int, set[int]] = {}  # branch -> segments of its last computed span
        self._call: _Call | None = None
        self._latent_hook: Any = None
        self._latent: torch.Tensor | None = None  # the latent of the call about to run, whole
        self._reduction: Any = None  # the signal group's context of the running call
        self._busy = threading.Lock()  # held during a transformer call
        self._owner: int | None = None  # the thread running the current generation
        self._installed: list[tuple[nn.Module, str, bool, bool]] = []

    # -- installing -----------------------------------------------------------------------------

    def install(self) -> None:
        self._hook(self.model, _CallHook(self))
        if self._wants_latent:  # a torch hook: it sees the call's arguments before any diffusers hook splits them
            self._latent_hook = self.model.register_forward_pre_hook(self._see_latent, with_kwargs=True)
        by_module: dict[nn.Module, list[tuple[Point, OutputSite]]] = {}
        for point, source in self._embeddings.items():
            if isinstance(source, OutputSite):
                by_module.setdefault(source.module, []).append((point, source))
        for module, sites in by_module.items():
            self._hook(module, _EmbeddingHook(self, sites))
        for block, place in self._places:
            self._hook(block, _SpanBlockHook(self, place))
        for site in self._sites:
            self._hook(site.module, _ModuleSiteHook(self, site, self.policy.may_reuse(site)))
        blocks = self.adapter.blocks()
        for index in sorted({site.block for site in self._sites if site.name in self._regated}):
            self._hook(blocks[index], _BlockArgumentsHook(self._block_calls, index), GATE_HOOK_NAME)
        self._forget_cached_children()

    def uninstall(self) -> None:
        """Remove every hook and whatever the hook registry added, leaving the modules as found."""
        if self._latent_hook is not None:
            self._latent_hook.remove()
            self._latent_hook = None
        for module, name, had_registry, had_forward in reversed(self._installed):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            remove_keeping_the_rest(registry, name)
            if not registry.hooks:
                if not had_forward:
                    del module.forward  # the registry leaves the original bound method behind
                if not had_registry:
                    del module._diffusers_hook
        self._installed.clear()
        self._forget_cached_children()

    def _hook(self, module: nn.Module, hook: ModelHook, name: str = HOOK_NAME) -> None:
        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        try:
            register_beneath_context_parallel(HookRegistry.check_if_exists_or_initialize(module), hook, name)
        except BaseException:
            if not had_registry and hasattr(module, "_diffusers_hook"):
                del module._diffusers_hook  # the registry made for a hook that did not go in
            raise
        self._installed.append((module, name, had_registry, had_forward))

    def _forget_cached_children(self) -> None:
        # diffusers caches which submodules carry hooks; ours just changed.
        registry = getattr(self.model, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()

    # -- running --------------------------------------------------------------------------------

    @torch.compiler.disable
    def begin_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        if not self._busy.acquire(blocking=False):
            raise ConcurrentUseError(self._concurrent("while another thread's call of it was running"))
        try:
            self._begin(args, kwargs)
        except BaseException:
            self._busy.release()
            raise

    @torch.compiler.disable
    def _see_latent(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._latent = self.adapter.latent(args, kwargs)

    def group(self) -> Any:
        """The process group decisions must agree over: the one given to `apply`, else the model's
        context-parallel group under diffusers' context parallelism, else None (no collectives)."""
        return self.process_group if self.process_group is not None else context_parallel_group(self.model)

    def _begin(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        timestep, sample = self.adapter.step_of(args, kwargs), self.adapter.latent_input(args, kwargs)
        thread = threading.get_ident()
        if self._owner not in (None, thread) and not self.tracker.opens_generation(timestep, sample):
            raise ConcurrentUseError(self._concurrent("in the middle of a generation another thread runs"))
        step = self.tracker.advance(timestep, sample)
        if self.tracker.generation != self._generation:
            self._owner = thread
            self._generation = self.tracker.generation
            self._joined_late = step.index > 0
            self._states.clear()
            self._kept.clear()
            self._gates.clear()
            self._computed_segments.clear()
            self.stats.generations.append(GenerationStats(self.tracker.num_steps))
        branch_stats = self.stats.last.branch(step.branch)
        branch_stats.calls += 1
        if self._sites:
            branch_stats.module_schedule.append(0)
        if step.branch not in self._states:
            self._states[step.branch] = self.policy.new_state()
        kept = self._kept.setdefault(step.branch, {})
        self._call = _Call(step, branch_stats, self._states[step.branch], kept, group=self.group())
        self._reduction = reduced_over(self._call.group)
        self._reduction.__enter__()
        if self._wants_latent:
            self._call.latent, self._latent = self._latent, None

    @torch.compiler.disable
    def end_call(self, output: Any) -> None:
        """The call is over (`output` None: it raised)."""
        call, self._call = self._call, None
        try:
            if self._wants_output and call is not None and output is not None:
                self.policy.observe(call.step, self.adapter.prediction(output), call.state)
        finally:
            if self._reduction is not None:
                self._reduction.__exit__(None, None, None)
                self._reduction = None
            self._busy.release()

    def _concurrent(self, when: str) -> str:
        return (
            f"{type(self.model).__name__} was called from a second thread {when}: a policy follows one generation "
            "at a time; give each thread its own transformer (or apply the policy per thread)"
        )

    @torch.compiler.disable
    def embedding_computed(self, point: Point, embedding: Any) -> None:
        if self._call is not None:
            self._call.embeddings[point] = embedding

    # The block and module forwards run between the steps below, so that torch.compile can
    # compile them; the bookkeeping and the policy's decisions stay out of its graphs.

    def span_block(
        self, place: _SpanPlace, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        call = self._call
        if call is None:  # a block run on its own, outside a transformer call
            return forward(*args, **kwargs)
        if place.first_block and (self._wants_probe or self._block_arguments):
            self._keep_first_block_signals(call, args, kwargs)
        if place.head:
            return self._head_block(call, place, forward, args, kwargs)
        if place.decides:
            self._decide_span(call)
        if not call.compute:
            return self._pass_through(call, place, args, kwargs)
        if place.opens:
            self._keep_inputs(call, place, args, kwargs)
        output = forward(*args, **kwargs)
        if place.closes:
            self._keep_residual(call, place, output)
        return output

    def _head_block(
        self,
        call: _Call,
        place: _SpanPlace,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> Any:
        """A block the policy keeps computed before the span it decides: runs, and its segment's
        residual on the first stream becomes a signal."""
        if place.opens:
            call.head_inputs[place.segment] = place.streams.read_inputs(args, kwargs)[0]
        output = forward(*args, **kwargs)
        if place.closes:
            self._keep_head_residual(call, place, output)
        return output

    @torch.compiler.disable
    def _keep_first_block_signals(self, call: _Call, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        if self._wants_probe:
            call.probe = self.adapter.probe(args, kwargs)
        for point, site in self._block_arguments.items():
            call.embeddings[point] = site.read(args, kwargs)

    @torch.compiler.disable
    def _keep_head_residual(self, call: _Call, place: _SpanPlace, output: Any) -> None:
        call.head_residual.append(place.streams.read_outputs(output)[0] - call.head_inputs[place.segment])

    @torch.compiler.disable
    def _decide_span(self, call: _Call) -> None:
        signals = Signals(
            probe=call.probe,
            timestep_embedding=call.embeddings.get(Point.TIMESTEP_EMBEDDING),
            projected_timestep_embedding=call.embeddings.get(Point.PROJECTED_TIMESTEP_EMBEDDING),
            latent=call.latent,
            head_residual=tuple(call.head_residual) if call.head_residual else None,
        )
        call.compute = self._decision(call, self.policy.decide_span(call.step, signals, call.state), "decide_span")
        if not call.compute and ("span", 0) not in call.kept:
            call.compute = self._compute_first("the span", call.step)
        call.stats.count("span", call.compute)
        call.stats.span_schedule.append(call.compute)

    def _decision(self, call: _Call, decision: Any, method: str) -> bool:
        """A policy's answer as a bool; anything else (a forgotten return, a tensor) is its mistake.
        Under context parallelism a policy not declared rank-consistent has its answer compared
        across the ranks: they must all compute or all skip, or each raises instead of hanging."""
        if not isinstance(decision, bool | np.bool_):
            raise PolicyError(
                f"{type(self.policy).__name__}.{method} returned {decision!r} ({type(decision).__name__}); "
                "a decision must be True (compute) or False (skip)"
            )
        if call.group is not None and not self.policy.rank_consistent:
            votes = torch.tensor([int(decision), -int(decision)], dtype=torch.int32)
            torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX, group=call.group)
            if votes[0] != -votes[1]:  # someone computes while someone skips
                raise RankDivergenceError(
                    f"{type(self.policy).__name__}.{method}: the ranks of the context-parallel group decided "
                    f"differently at step {call.step.index} (branch {call.step.branch}); compute its signals with "
                    "cachekit.signals (reduced over the group) and set rank_consistent = True"
                )
        return bool(decision)

    @torch.compiler.disable
    def _keep_inputs(self, call: _Call, place: _SpanPlace, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        if place.decides:
            self._computed_segments[call.step.branch] = set()
        call.inputs[place.segment] = place.streams.read_inputs(args, kwargs)

    @torch.compiler.disable
    def _keep_residual(self, call: _Call, place: _SpanPlace, output: Any) -> None:
        outputs = place.streams.read_outputs(output)
        inputs = call.inputs[place.segment]
        residual = tuple(None if out is None else out - inp for out, inp in zip(outputs, inputs, strict=True))
        self._record(call, ("span", place.segment), residual)
        self._computed_segments[call.step.branch].add(place.segment)

    @torch.compiler.disable
    def _pass_through(self, call: _Call, place: _SpanPlace, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """On reuse: the block's inputs unchanged, plus the segment's estimated residual at its
        last block.

        A stream the block returned as None when computed (a last block that drops the text
        tokens) is returned as None again."""
        inputs = place.streams.read_inputs(args, kwargs)
        passed: Residual = inputs
        if place.closes:
            if place.segment not in self._computed_segments.get(call.step.branch, ()):
                raise PolicyError(
                    f"segment {place.segment} of the residual span ran while reusing, but not when the span was "
                    "last computed: the model took a different path through its blocks"
                )
            residual = call.kept[("span", place.segment)].estimate(call.step)
            passed = tuple(
                None if delta is None else value + delta for value, delta in zip(inputs, residual, strict=True)
            )
        return place.streams.pack(passed)

    def _record(self, call: _Call, key: Key, value: Any) -> None:
        """A computed value into the branch's estimator state for `key`; the memory kept is counted."""
        kept = call.kept.get(key)
        if kept is None:
            kept = call.kept[key] = Kept(self.estimator)
        before = kept.nbytes()
        kept.record(value, call.step)
        call.stats.keep(kept.nbytes() - before)

    def module_site(
        self,
        site: ModuleSite,
        keep: bool,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> Any:
        call = self._call
        if call is None:
            return forward(*args, **kwargs)
        compute, key = self._decide_module(call, site)
        if not compute:
            return self._estimate(call, site, key)
        output = forward(*args, **kwargs)
        if keep:
            self._keep_output(call, site, key, output)
        return output

    @torch.compiler.disable
    def _decide_module(self, call: _Call, site: ModuleSite) -> tuple[bool, tuple[str, int]]:
        """The policy decides at a module's first run in a transformer call; a module that runs
        again in the same call (once per token stream, say) follows that decision, and each of its
        runs keeps an output of its own."""
        occurrence = call.module_runs.get(site.name, 0)
        call.module_runs[site.name] = occurrence + 1
        if occurrence == 0:
            decision = self.policy.decide_module(call.step, site, call.state)
            call.module_decisions[site.name] = self._decision(call, decision, f"decide_module at {site.name}")
        compute = call.module_decisions[site.name]
        key = (site.name, occurrence)
        if not compute and key not in call.kept:
            compute = call.module_decisions[site.name] = self._compute_first(site.name, call.step)
        call.stats.count(site.kind.value, compute)
        call.stats.module_schedule[-1] += compute
        return compute, key

    @torch.compiler.disable
    def _keep_output(self, call: _Call, site: ModuleSite, key: Key, output: Any) -> None:
        self._record(call, key, output)
        if site.name in self._regated:
            self._gates.setdefault(call.step.branch, {})[key] = self._gate(site)

    @torch.compiler.disable
    def _estimate(self, call: _Call, site: ModuleSite, key: Key) -> Any:
        value = call.kept[key].estimate(call.step)
        if site.name not in self._regated:
            return value
        # the block multiplies by the current gate: what it adds is the kept gate times the value
        return value * (self._gates[call.step.branch][key] / _nonzero(self._gate(site)))

    def _gate(self, site: ModuleSite) -> torch.Tensor:
        args, kwargs = self._block_calls[site.block]
        return self.adapter.gate(site, args, kwargs)

    def _compute_first(self, what: str, step: Step) -> bool:
        """A reuse with nothing stored: the second expert of a pipeline starts mid-generation with
        nothing of its own, so it computes; anywhere else the policy is at fault."""
        if self._joined_late:
            return True
        raise PolicyError(
            f"strategy {self.policy.name()!r} chose to reuse {what} at step {step.index} "
            f"(branch {step.branch}) before computing it once in this generation"
        )


class _CallHook(ModelHook):
    """On the transformer: frames each call with its step and branch."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.runtime.begin_call(args, kwargs)
        try:
            output = self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self.runtime.end_call(None)
            raise
        self.runtime.end_call(output)
        return output


@dataclass(frozen=True)
class _SpanPlace:
    """Where a block sits in the residual span. The blocks the policy keeps computed at the head
    are numbered in segments of their own; the tail's are not hooked."""

    segment: int
    opens: bool  # first block of its segment
    closes: bool  # last block of its segment
    streams: BlockStreams
    head: bool = False  # always computed, before the decided span
    decides: bool = False  # the first block of the decided span: the policy decides here
    first_block: bool = False  # block 0 of the model: the probe is read here


def _each_once(model: nn.Module, modules: list[nn.Module], what: str) -> None:
    """One module at two places (weight-tied blocks, a block list named twice) cannot be told
    apart between its calls: refuse it, naming where it appears."""
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    seen: dict[int, int] = {}
    for index, module in enumerate(modules):
        if id(module) in seen:
            raise UnsupportedModelError(
                f"{type(model).__name__}: the same {what} ({names.get(id(module), type(module).__name__)!r}) appears "
                f"at positions {seen[id(module)]} and {index}: cachekit keeps state per {what} and cannot tell "
                "the calls of a module used twice apart (weight-tied blocks are not supported)"
            )
        seen[id(module)] = index


def _places(adapter: Adapter, policy: CachePolicy[Any]) -> list[tuple[nn.Module, _SpanPlace]]:
    """Each block of the span the policy runs on, with its place: segments cut where the head
    (always computed) ends and the tail (always computed, not hooked) begins."""
    segments = adapter.span().segments
    blocks = sum(len(segment) for segment in segments)
    first, last = policy.always_computed()
    if first < 0 or last < 0 or first + last >= blocks:
        raise ValueError(
            f"strategy {policy.name()!r} keeps {first} blocks at the head and {last} at the tail of the span always "
            f"computed, but {type(adapter.model).__name__} has {blocks} blocks: at least one must remain to skip "
            f"(need 0 <= first + last < {blocks})"
        )
    head: list[Segment] = []
    decided: list[Segment] = []
    index = 0
    for segment in segments:
        for region, low, high in ((head, 0, first), (decided, first, blocks - last)):
            part = tuple(entry for position, entry in enumerate(segment, start=index) if low <= position < high)
            if part:
                region.append(part)
        index += len(segment)
    places: list[tuple[nn.Module, _SpanPlace]] = []
    for region, is_head in ((head, True), (decided, False)):
        for number, segment in enumerate(region):
            for position, (block, streams) in enumerate(segment):
                place = _SpanPlace(
                    segment=number,
                    opens=position == 0,
                    closes=position == len(segment) - 1,
                    streams=streams,
                    head=is_head,
                    decides=not is_head and number == 0 and position == 0,
                    first_block=not places,
                )
                places.append((block, place))
    return places


class _SpanBlockHook(ModelHook):
    """On each block of the residual span: runs it, or passes through and re-applies."""

    def __init__(self, runtime: Runtime, place: _SpanPlace) -> None:
        super().__init__()
        self.runtime = runtime
        self.place = place

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.span_block(self.place, self.fn_ref.original_forward, args, kwargs)


class _ModuleSiteHook(ModelHook):
    """On an attention or MLP module: runs it, or returns the branch's last output."""

    def __init__(self, runtime: Runtime, site: ModuleSite, keep: bool) -> None:
        super().__init__()
        self.runtime = runtime
        self.site = site
        self.keep = keep

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.module_site(self.site, self.keep, self.fn_ref.original_forward, args, kwargs)


class _BlockArgumentsHook(ModelHook):
    """On a block with re-gated sites: keeps the arguments of its current call, the gates' source."""

    def __init__(self, calls: dict[int, tuple[tuple[Any, ...], Mapping[str, Any]]], block: int) -> None:
        super().__init__()
        self.calls = calls
        self.block = block

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.calls[self.block] = (args, kwargs)
        return args, kwargs


def _nonzero(gate: torch.Tensor) -> torch.Tensor:
    """`gate` with exact zeros (where the block adds nothing) made tiny, so the ratio stays finite."""
    return torch.where(gate == 0, torch.finfo(gate.dtype).tiny, gate)


class _EmbeddingHook(ModelHook):
    """On the timestep embedder: hands its output (or items of it) to the call's signals."""

    def __init__(self, runtime: Runtime, sites: list[tuple[Point, OutputSite]]) -> None:
        super().__init__()
        self.runtime = runtime
        self.sites = sites

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        for point, site in self.sites:
            self.runtime.embedding_computed(point, site.read(output))
        return output
