"""Running attention and MLP module sites: a module computes, or returns the output the estimator
gives for it. The strategy decides once per decision key in a call (`Strategy.decision_key`: per
attention kind for PAB, once for a step-only schedule) at the first site of that key; a module run
more than once in a call (once per token stream, say) keeps an output per run.

A gated site whose strategy reuses what the block added (`reuses_gated`) returns the kept output
times the kept gate over the current gate, as the block multiplies by the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from cachekit.adapter import Adapter, ModuleSite
from cachekit.runtime.framing import Call, Frames, Key
from cachekit.runtime.memory import Memory
from cachekit.strategy import Strategy

#: A block's arguments in its current call, by block index: the source of its gates.
BlockCalls = dict[int, tuple[tuple[Any, ...], Mapping[str, Any]]]


class Modules:
    def __init__(
        self, frames: Frames, memory: Memory, adapter: Adapter, strategy: Strategy[Any], regated: set[str]
    ) -> None:
        self.frames = frames
        self.memory = memory
        self.adapter = adapter
        self.strategy = strategy
        self.regated = regated
        self.block_calls: BlockCalls = {}

    def run(
        self,
        site: ModuleSite,
        decides: Any,
        keep: bool,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> Any:
        call = self.frames.call
        if call is None:
            return forward(*args, **kwargs)
        compute, key, inputs = self._decide(call, site, decides, args, kwargs)
        if not compute:
            return self._estimate(call, site, key)
        output = forward(*args, **kwargs)
        if keep:
            self._keep(call, site, key, output, inputs)
        return output

    @torch.compiler.disable
    def _decide(
        self, call: Call, site: ModuleSite, decides: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[bool, Key, tuple[Any, ...]]:
        run = call.module_runs.get(site.name, 0)
        call.module_runs[site.name] = run + 1
        compute = call.decisions.get(decides)
        if compute is None:
            decision = self.strategy.decide_module(call.step, site, call.branch.state)
            compute = call.decisions[decides] = self.frames.decision(call, decision, f"decide_module at {site.name}")
        key = (site.name, run)
        inputs = (args[0] if args else kwargs.get("hidden_states"),)
        if not compute:
            compute = self.memory.must_compute(call, key, site.name, inputs)
        call.branch.stats.count(site.kind.value, compute)
        call.computed_modules += compute
        return compute, key, inputs

    @torch.compiler.disable
    def _keep(self, call: Call, site: ModuleSite, key: Key, output: Any, inputs: tuple[Any, ...]) -> None:
        self.memory.record(call, key, output, inputs)
        if site.name in self.regated:
            call.branch.gates[key] = self._gate(site)

    @torch.compiler.disable
    def _estimate(self, call: Call, site: ModuleSite, key: Key) -> Any:
        value = self.memory.estimate(call, key)
        if site.name not in self.regated:
            return value
        # the block multiplies by the current gate: what it adds is the kept gate times the value
        return value * (call.branch.gates[key] / _nonzero(self._gate(site)))

    def _gate(self, site: ModuleSite) -> torch.Tensor:
        args, kwargs = self.block_calls[site.block]
        return self.adapter.gate(site, args, kwargs)


def _nonzero(gate: torch.Tensor) -> torch.Tensor:
    """`gate` with exact zeros (where the block adds nothing) made tiny, so the ratio stays finite."""
    return torch.where(gate == 0, torch.finfo(gate.dtype).tiny, gate)


class BlockArgumentsHook(ModelHook):
    """On a block with re-gated sites: keeps the arguments of its current call, the gates' source."""

    def __init__(self, calls: BlockCalls, block: int) -> None:
        super().__init__()
        self.calls = calls
        self.block = block

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.calls[self.block] = (args, kwargs)
        return args, kwargs
