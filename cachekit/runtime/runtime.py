"""The `Runtime`: one strategy and its estimator on one transformer, from the strategy's points to the
hooks that serve them."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from cachekit.adapter import LATENT, OUTPUT, Adapter, BlockArgument, CallSignal, FirstBlockSignal, OutputSite, Place
from cachekit.errors import MissingPointError, StrategyError
from cachekit.estimator import Estimator
from cachekit.runtime.branching import BranchLevel
from cachekit.runtime.framing import CallHook, Frames, OutputSignalHook
from cachekit.runtime.installing import Installer, each_once
from cachekit.runtime.memory import Memory
from cachekit.runtime.modules import BlockArgumentsHook, Modules
from cachekit.runtime.span import Span, span_places
from cachekit.stats import CacheStats
from cachekit.steps import StepTracker
from cachekit.strategy import Strategy

GATE_HOOK_NAME = "cachekit-gate"  # on a block whose gated sites' values are re-gated


class Runtime:
    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        strategy: Strategy[Any],
        estimator: Estimator[Any],
        tracker: StepTracker,
        process_group: Any = None,
        branch_estimator: Estimator[Any] | None = None,
    ):
        self.model = model
        self.adapter = adapter
        self.strategy = strategy
        self.estimator = estimator
        self.tracker = tracker
        info = {
            **strategy.attach(adapter),
            "estimator": strategy.config.estimator.model_dump(mode="json", exclude_none=True),
        }
        settings = strategy.config.model_dump(mode="json", exclude={"strategy", "estimator"}, exclude_none=True)
        self.stats = CacheStats(strategy=strategy.name(), adapter=adapter.name, info=info, settings=settings)
        points = strategy.required_points()  # after attach, which may settle what the strategy reads
        for point in sorted(points):
            adapter.require(point, strategy.name())
        exposed = adapter.signals() if points - {*Place, OUTPUT} else {}
        self._signals = {name: exposed[name] for name in sorted(points - {*Place, OUTPUT})}
        self._places = span_places(adapter, strategy) if Place.SPAN in points else []
        first_block = {n: s for n, s in self._signals.items() if isinstance(s, BlockArgument | FirstBlockSignal)}
        if first_block and not self._places:
            raise StrategyError(
                f"strategy {strategy.name()!r} reads {', '.join(first_block)} from the first block's arguments "
                f"on {type(model).__name__}, which it can only do when it also requires the span"
            )
        self._sites = [
            *(adapter.attention_sites() if Place.ATTENTION in points else []),
            *(adapter.mlp_sites() if Place.MLP in points else []),
        ]
        branches = strategy.config.branches
        branching = None
        if branches is not None:
            assert branch_estimator is not None, "a branch level needs its estimator"
            branching = BranchLevel(branches, branch_estimator, adapter, _dtype(branches.estimator.dtype))
        estimators = [estimator, *([branch_estimator] if branch_estimator is not None else [])]
        trajectory = frozenset().union(*(each.trajectory for each in estimators))
        for each in estimators:
            if "latent" in each.trajectory and LATENT in adapter.missing:
                raise MissingPointError(
                    f"estimator {each.name()!r} needs the latent of each call, which the {adapter.name!r} adapter "
                    f"does not provide for {type(model).__name__}: {adapter.missing[LATENT]}; choose an estimator "
                    "that needs only the cached values (copy, taylor, dmd, ...)"
                )
        each_once(model, [block for block, _ in self._places], "block")
        each_once(model, [site.module for site in self._sites], "attention/MLP module")
        self._keeps = {site.name: strategy.may_reuse(site) for site in self._sites}
        self.frames = Frames(
            model,
            adapter,
            strategy,
            tracker,
            self.stats,
            process_group,
            call_signals={n: s for n, s in self._signals.items() if isinstance(s, CallSignal)},
            wants_output=OUTPUT in points,
            module_sites=bool(self._sites),
            branching=branching,
            trajectory=trajectory,
        )
        dtype = strategy.config.estimator.dtype
        segments = len({place.segment for _, place in self._places if not place.head})
        self.memory = Memory(
            self.frames,
            estimator,
            sites=segments + sum(self._keeps.values()),
            where="sites (span segments and attention/MLP modules)" if self._sites else "segments of the span",
            limit=strategy.config.max_kept_bytes,
            storage=_dtype(dtype),
        )
        if branching is not None:
            branching.grown = self.memory.kept_by_the_branch_level
        self.span = Span(self.frames, self.memory, strategy, first_block)
        regated = {site.name for site in self._sites if site.gated and strategy.reuses_gated(site)}
        self.modules = Modules(self.frames, self.memory, adapter, strategy, regated)
        self._installer = Installer(model)
        self._call_hook: Any = None

    def install(self) -> None:
        hook, frames, adapter = self._installer.hook, self.frames, self.adapter
        hook(self.model, CallHook(frames))
        if frames.call_signals:  # a torch hook: it sees the call's arguments before any diffusers hook splits them
            self._call_hook = self.model.register_forward_pre_hook(frames.see_call, with_kwargs=True)
        by_module: dict[nn.Module, list[tuple[str, OutputSite]]] = {}
        for name, source in self._signals.items():
            if isinstance(source, OutputSite):
                by_module.setdefault(source.module, []).append((name, source))
        for module, sites in by_module.items():
            hook(module, OutputSignalHook(frames, sites))
        route = self._installer.route  # blocks and modules: called by the dozen, routed cheaply
        for block, place in self._places:
            route(block, functools.partial(self.span.block, place))
        for site in self._sites:
            decides, keeps = self.strategy.decision_key(site), self._keeps[site.name]
            route(site.module, functools.partial(self.modules.run, site, decides, keeps))
        blocks = adapter.blocks()
        for index in sorted({site.block for site in self._sites if site.name in self.modules.regated}):
            hook(blocks[index], BlockArgumentsHook(self.modules.block_calls, index), GATE_HOOK_NAME)
        self._installer.forget_cached_children()

    def uninstall(self) -> None:
        """Remove every hook, leaving the modules as found."""
        if self._call_hook is not None:
            self._call_hook.remove()
            self._call_hook = None
        self._installer.uninstall()


def _dtype(name: str | None) -> torch.dtype | None:
    """An estimator config's storage dtype."""
    return getattr(torch, name) if name else None
