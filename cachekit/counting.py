"""What really ran in a transformer, counted from the outside with plain torch hooks.

A study counts the work of every method the same way, whatever the method's own bookkeeping
says (diffusers' hooks keep none): a block executes in a call when any leaf module of its
attention or MLP modules runs inside it (a cache's own signal, like a norm run for a probe, does
not count); an attention module executes when any of its leaves runs. FLOPs skipped add up per
call: a whole block's where the block did not execute, else those of its modules that did not.

A block run on part of the call's batch (the batched branch level runs the conditional half alone)
counts as that part of an execution.

A module that is itself a leaf (an MLP that is one Linear) is watched through its own forward,
which a cache that skips the module never calls; so open the counter before applying a cache, and
close it after removing the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from cachekit.adapter import Adapter, ModuleSite, Place


@dataclass
class Work:
    """What ran during the counted calls."""

    calls: int = 0
    blocks: int = 0  # blocks per call
    block_runs: float = 0.0  # a run on half the call's batch counts half
    attention_sites: int = 0  # attention modules per call
    attention_runs: int = 0
    flops_skipped: float = 0.0

    @property
    def block_share(self) -> float:
        return self.block_runs / (self.calls * self.blocks) if self.calls else 1.0

    @property
    def attention_share(self) -> float | None:
        total = self.calls * self.attention_sites
        return self.attention_runs / total if total else None


@dataclass
class _Watch:
    """One block: whether any of its watched leaves ran in the current call, per site too."""

    flops: float
    sites: list[tuple[ModuleSite, float]]
    ran: bool = False
    share: float = 1.0  # of the call's batch the block runs on
    site_ran: dict[str, bool] = field(default_factory=dict)


class WorkCounter:
    """Counts block and attention executions (and the FLOPs skipped, given per-module FLOPs) of
    every transformer call while it is open. `flops` maps a block or site module to its FLOPs
    per call; absent modules count as free."""

    def __init__(self, model: nn.Module, adapter: Adapter, flops: dict[nn.Module, float] | None = None) -> None:
        flops = flops or {}
        blocks = adapter.blocks()
        sites = [
            *(adapter.attention_sites() if adapter.provides(Place.ATTENTION) else []),
            *(adapter.mlp_sites() if adapter.provides(Place.MLP) else []),
        ]
        self.work = Work(blocks=len(blocks), attention_sites=sum(site.kind.value != "mlp" for site in sites))
        self._adapter = adapter
        self._batch = 1  # of the current call
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._call, with_kwargs=True)]
        self._wrapped: list[nn.Module] = []
        for index, block in enumerate(blocks):
            own = [site for site in sites if site.block == index]
            watch = _Watch(flops.get(block, 0.0), [(site, flops.get(site.module, 0.0)) for site in own])
            self._handles.append(block.register_forward_pre_hook(self._enter(watch), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._leave(watch)))
            for site in own:
                self._watch(site.module, self._ran(watch, site.name))
            if not own:  # a block without declared sites: any of its leaves
                self._watch(block, self._ran(watch, None))

    def _watch(self, module: nn.Module, ran: Any) -> None:
        """Call `ran` whenever a leaf inside `module` (or `module`, a leaf itself) computes."""
        leaves = [sub for sub in module.modules() if next(sub.children(), None) is None]
        if leaves != [module]:
            self._handles += [leaf.register_forward_hook(ran) for leaf in leaves]
            return
        forward = module.forward

        def counted(*args: Any, **kwargs: Any) -> Any:
            ran()
            return forward(*args, **kwargs)

        module.forward = counted
        self._wrapped.append(module)

    def _call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.work.calls += 1
        self._batch = _batch(self._adapter.latent_input(args, kwargs))

    def reset(self) -> None:
        """Count from zero (e.g. for the next generation)."""
        self.work = Work(blocks=self.work.blocks, attention_sites=self.work.attention_sites)

    def _enter(self, watch: _Watch) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            watch.ran = False
            watch.site_ran = {}
            first = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
            watch.share = min(1.0, _batch(first) / self._batch) if first is not None else 1.0

        return hook

    def _ran(self, watch: _Watch, site: str | None) -> Any:
        def hook(*_: Any) -> None:
            watch.ran = True
            if site is not None:
                watch.site_ran[site] = True

        return hook

    def _leave(self, watch: _Watch) -> Any:
        def hook(*_: Any) -> None:
            work = self.work
            if not watch.ran:
                work.flops_skipped += watch.flops
                return
            work.block_runs += watch.share
            for site, flops in watch.sites:
                ran = watch.site_ran.get(site.name, False)
                if site.kind.value != "mlp":
                    work.attention_runs += ran
                if not ran:
                    work.flops_skipped += flops

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._wrapped:
            del module.forward

    def __enter__(self) -> WorkCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _batch(tensor: torch.Tensor) -> int:
    return tensor.shape[0] if tensor.ndim else 1
