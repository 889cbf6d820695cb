"""The plumbing between one transformer and one policy.

Hooks (diffusers' `ModelHook`s, so they stack with diffusers' own offloading and casting hooks)
sit on the transformer, on the blocks of the residual span and on attention/MLP modules, only
where the policy asked. The transformer hook turns each call into a step and branch; the first
span block asks the policy; on reuse the span blocks pass their inputs through and the last block
of each segment adds the branch's stored residual for it; a module site returns the branch's
stored output instead of running. Nothing else changes: what computes runs its own forward on the exact same arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from cachekit.adapter import Adapter, BlockStreams, ModuleSite, OutputSite, Point, Streams
from cachekit.errors import PolicyError
from cachekit.policy import CachePolicy, Signals, Step
from cachekit.stats import BranchStats, CacheStats, GenerationStats
from cachekit.steps import StepTracker

Residual = tuple[torch.Tensor | None, ...]

HOOK_NAME = "cachekit"


@dataclass
class _Call:
    """What the runtime knows during one transformer call."""

    step: Step
    stats: BranchStats
    state: Any
    inputs: dict[int, Streams] = field(default_factory=dict)  # segment -> its streams on entry
    compute: bool = True
    module_runs: dict[str, int] = field(default_factory=dict)  # site -> runs so far in this call
    module_decisions: dict[str, bool] = field(default_factory=dict)  # site -> decision of this call
    timestep_embedding: Any = None


class Runtime:
    def __init__(self, model: nn.Module, adapter: Adapter, policy: CachePolicy[Any], tracker: StepTracker):
        self.model = model
        self.adapter = adapter
        self.policy = policy
        self.tracker = tracker  # shared by the experts of one pipeline
        self._generation = -1  # the tracker's generation this runtime's state belongs to
        self._joined_late = False  # this transformer's first call of the generation came after step 0
        self.stats = CacheStats(strategy=policy.name(), adapter=adapter.name, info=policy.attach(adapter))
        points = policy.required_points()
        self._wants_probe = Point.PROBE in points
        self._embedding = adapter.timestep_embedding() if Point.TIMESTEP_EMBEDDING in points else None
        self._span = adapter.span() if Point.SPAN in points else None
        self._sites = [
            *(adapter.attention_sites() if Point.ATTENTION in points else []),
            *(adapter.mlp_sites() if Point.MLP in points else []),
        ]
        self._states: dict[int, Any] = {}
        self._residuals: dict[int, dict[int, Residual]] = {}  # branch -> segment -> residual
        self._outputs: dict[int, dict[tuple[str, int], Any]] = {}  # branch -> (site, occurrence) -> output
        self._call: _Call | None = None
        self._installed: list[tuple[nn.Module, bool, bool]] = []

    # -- installing -----------------------------------------------------------------------------

    def install(self) -> None:
        self._hook(self.model, _CallHook(self))
        if self._embedding is not None:
            self._hook(self._embedding.module, _EmbeddingHook(self, self._embedding))
        if self._span is not None:
            for number, segment in enumerate(self._span.segments):
                for position, (block, streams) in enumerate(segment):
                    place = _SpanPlace(number, position == 0, position == len(segment) - 1, streams)
                    self._hook(block, _SpanBlockHook(self, place))
        for site in self._sites:
            self._hook(site.module, _ModuleSiteHook(self, site, self.policy.may_reuse(site)))
        self._forget_cached_children()

    def uninstall(self) -> None:
        """Remove every hook and whatever the hook registry added, leaving the modules as found."""
        for module, had_registry, had_forward in reversed(self._installed):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.remove_hook(HOOK_NAME, recurse=False)
            if not registry.hooks:
                if not had_forward:
                    del module.forward  # the registry leaves the original bound method behind
                if not had_registry:
                    del module._diffusers_hook
        self._installed.clear()
        self._forget_cached_children()

    def _hook(self, module: nn.Module, hook: ModelHook) -> None:
        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
        self._installed.append((module, had_registry, had_forward))

    def _forget_cached_children(self) -> None:
        # diffusers caches which submodules carry hooks; ours just changed.
        registry = getattr(self.model, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()

    # -- running --------------------------------------------------------------------------------

    @torch.compiler.disable
    def begin_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        timestep = float(self.adapter.timestep(args, kwargs).max())
        step = self.tracker.advance(timestep)
        if self.tracker.generation != self._generation:
            self._generation = self.tracker.generation
            self._joined_late = step.index > 0
            self._states.clear()
            self._residuals.clear()
            self._outputs.clear()
            self.stats.generations.append(GenerationStats(self.tracker.num_steps))
        branch_stats = self.stats.last.branch(step.branch)
        branch_stats.calls += 1
        if self._sites:
            branch_stats.module_schedule.append(0)
        if step.branch not in self._states:
            self._states[step.branch] = self.policy.new_state()
        self._call = _Call(step, branch_stats, self._states[step.branch])

    @torch.compiler.disable
    def end_call(self) -> None:
        self._call = None

    @torch.compiler.disable
    def embedding_computed(self, embedding: Any) -> None:
        if self._call is not None:
            self._call.timestep_embedding = embedding

    # The block and module forwards run between the steps below, so that torch.compile can
    # compile them; the bookkeeping and the policy's decisions stay out of its graphs.

    def span_block(
        self, place: _SpanPlace, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        call = self._call
        if call is None:  # a block run on its own, outside a transformer call
            return forward(*args, **kwargs)
        if place.opens and place.segment == 0:
            self._decide_span(call, args, kwargs)
        if not call.compute:
            return self._pass_through(call, place, args, kwargs)
        if place.opens:
            self._keep_inputs(call, place, args, kwargs)
        output = forward(*args, **kwargs)
        if place.closes:
            self._keep_residual(call, place, output)
        return output

    @torch.compiler.disable
    def _decide_span(self, call: _Call, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        signals = Signals(
            probe=self.adapter.probe(args, kwargs) if self._wants_probe else None,
            timestep_embedding=call.timestep_embedding,
        )
        call.compute = self.policy.decide_span(call.step, signals, call.state)
        if not call.compute and call.step.branch not in self._residuals:
            call.compute = self._compute_first("the span", call.step)
        call.stats.count("span", call.compute)
        call.stats.span_schedule.append(call.compute)

    @torch.compiler.disable
    def _keep_inputs(self, call: _Call, place: _SpanPlace, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        if place.segment == 0:  # a new computed span: forget the residuals of the last one
            self._residuals[call.step.branch] = {}
        call.inputs[place.segment] = place.streams.read_inputs(args, kwargs)

    @torch.compiler.disable
    def _keep_residual(self, call: _Call, place: _SpanPlace, output: Any) -> None:
        outputs = place.streams.read_outputs(output)
        inputs = call.inputs[place.segment]
        self._residuals[call.step.branch][place.segment] = tuple(
            None if out is None else out - inp for out, inp in zip(outputs, inputs, strict=True)
        )

    @torch.compiler.disable
    def _pass_through(self, call: _Call, place: _SpanPlace, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """On reuse: the block's inputs unchanged, plus the segment's residual at its last block.

        A stream the block returned as None when computed (a last block that drops the text
        tokens) is returned as None again."""
        inputs = place.streams.read_inputs(args, kwargs)
        passed: Residual = inputs
        if place.closes:
            residual = self._residuals[call.step.branch].get(place.segment)
            if residual is None:
                raise PolicyError(
                    f"segment {place.segment} of the residual span ran while reusing, but not when the span was "
                    "last computed: the model took a different path through its blocks"
                )
            passed = tuple(
                None if delta is None else value + delta for value, delta in zip(inputs, residual, strict=True)
            )
        return place.streams.pack(passed)

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
            return self._outputs[call.step.branch][key]
        output = forward(*args, **kwargs)
        if keep:
            self._keep_output(call, key, output)
        return output

    @torch.compiler.disable
    def _decide_module(self, call: _Call, site: ModuleSite) -> tuple[bool, tuple[str, int]]:
        """The policy decides at a module's first run in a transformer call; a module that runs
        again in the same call (once per token stream, say) follows that decision, and each of its
        runs keeps an output of its own."""
        occurrence = call.module_runs.get(site.name, 0)
        call.module_runs[site.name] = occurrence + 1
        if occurrence == 0:
            call.module_decisions[site.name] = self.policy.decide_module(call.step, site, call.state)
        compute = call.module_decisions[site.name]
        key = (site.name, occurrence)
        if not compute and key not in self._outputs.get(call.step.branch, {}):
            compute = call.module_decisions[site.name] = self._compute_first(site.name, call.step)
        call.stats.count(site.kind.value, compute)
        call.stats.module_schedule[-1] += compute
        return compute, key

    @torch.compiler.disable
    def _keep_output(self, call: _Call, key: tuple[str, int], output: Any) -> None:
        self._outputs.setdefault(call.step.branch, {})[key] = output

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
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.runtime.end_call()


@dataclass(frozen=True)
class _SpanPlace:
    """Where a block sits in the residual span."""

    segment: int
    opens: bool  # first block of its segment
    closes: bool  # last block of its segment
    streams: BlockStreams


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


class _EmbeddingHook(ModelHook):
    """On the timestep embedder: hands its output to the call's signals."""

    def __init__(self, runtime: Runtime, site: OutputSite) -> None:
        super().__init__()
        self.runtime = runtime
        self.site = site

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.runtime.embedding_computed(self.site.read(output))
        return output
