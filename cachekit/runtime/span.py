"""Running the residual span: its first decided block asks the strategy; on reuse every block passes
its inputs through and the last block of each segment adds the residual the estimator gives for
it. Blocks the strategy keeps computed at the head of the span always run, and their residual is a
signal; those at the tail are not hooked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cachekit.adapter import Adapter, BlockArgument, BlockStreams, FirstBlockSignal, Segment
from cachekit.errors import StrategyError
from cachekit.runtime.branching import kept_half
from cachekit.runtime.framing import Call, Frames
from cachekit.runtime.memory import Memory
from cachekit.strategy import Signals, Strategy


@dataclass(frozen=True)
class SpanPlace:
    """Where a block sits in the residual span. The blocks the strategy keeps computed at the head
    are numbered in segments of their own; the tail's are not hooked."""

    segment: int
    opens: bool  # first block of its segment
    closes: bool  # last block of its segment
    streams: BlockStreams
    head: bool = False  # always computed, before the decided span
    decides: bool = False  # the first block of the decided span: the strategy decides here
    first_block: bool = False  # block 0 of the model: the probe is read here
    #: Neither opens nor closes a segment, reads nothing, decides nothing: on reuse it only passes
    #: its inputs through.
    inner: bool = field(init=False)

    def __post_init__(self) -> None:
        inner = not (self.opens or self.closes or self.head or self.decides or self.first_block)
        object.__setattr__(self, "inner", inner)


def span_places(adapter: Adapter, strategy: Strategy[Any]) -> list[tuple[nn.Module, SpanPlace]]:
    """Each block of the span the strategy runs on, with its place: segments cut where the head
    (always computed) ends and the tail (always computed, not hooked) begins."""
    segments = adapter.span().segments
    blocks = sum(len(segment) for segment in segments)
    first, last = strategy.always_computed()
    if first < 0 or last < 0 or first + last >= blocks:
        raise ValueError(
            f"strategy {strategy.name()!r} keeps {first} blocks at the head and {last} at the tail of the span always "
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
    places: list[tuple[nn.Module, SpanPlace]] = []
    for region, is_head in ((head, True), (decided, False)):
        for number, segment in enumerate(region):
            for position, (block, streams) in enumerate(segment):
                place = SpanPlace(
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


class Span:
    """The span's blocks, run or passed through as the strategy decides."""

    def __init__(
        self,
        frames: Frames,
        memory: Memory,
        strategy: Strategy[Any],
        first_block: dict[str, BlockArgument | FirstBlockSignal],
    ) -> None:
        self.frames = frames
        self.memory = memory
        self.strategy = strategy
        self.first_block = first_block  # signals read from the first block's arguments

    def block(
        self, place: SpanPlace, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        call = self.frames.call
        if call is None:  # a block run on its own, outside a transformer call
            return forward(*args, **kwargs)
        if not call.compute and place.inner:  # most blocks of a reused call
            return place.streams.passed(args, kwargs)
        if place.first_block and self.first_block:
            self._keep_first_block_signals(call, args, kwargs)
        if place.head:
            return self._head_block(call, place, forward, args, kwargs)
        if place.decides:
            self._decide(call, place, args, kwargs)
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
        call: Call,
        place: SpanPlace,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> Any:
        """A block the strategy keeps computed before the span it decides: runs, and its segment's
        residual on the first stream becomes a signal."""
        if place.opens:
            call.head_inputs[place.segment] = place.streams.read_inputs(args, kwargs)[0]
        output = forward(*args, **kwargs)
        if place.closes:
            self._keep_head_residual(call, place, output)
        return output

    @torch.compiler.disable
    def _keep_first_block_signals(self, call: Call, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        for name, source in self.first_block.items():
            call.signals[name] = source.read(args, kwargs)

    @torch.compiler.disable
    def _keep_head_residual(self, call: Call, place: SpanPlace, output: Any) -> None:
        call.head_residual.append(place.streams.read_outputs(output)[0] - call.head_inputs[place.segment])

    @torch.compiler.disable
    def _decide(self, call: Call, place: SpanPlace, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        values = call.signals
        if call.head_residual:
            values = {**values, "head_residual": tuple(call.head_residual)}
        if call.halves:  # batched CFG under the branch level: decide from the kept half, as when it runs alone
            values = {name: _kept_halves(value, call.batch) for name, value in values.items()}
        signals = Signals(values)
        frames, branch = self.frames, call.branch
        call.compute = frames.decision(call, self.strategy.decide_span(call.step, signals, branch.state), "decide_span")
        if not call.compute:
            call.compute = self.memory.must_compute(
                call, ("span", 0), "the span", place.streams.read_inputs(args, kwargs)
            )
        branch.stats.count("span", call.compute)
        branch.stats.span_schedule.append(call.compute)

    @torch.compiler.disable
    def _keep_inputs(self, call: Call, place: SpanPlace, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        if place.decides:
            call.branch.segments = set()
        call.inputs[place.segment] = place.streams.read_inputs(args, kwargs)

    @torch.compiler.disable
    def _keep_residual(self, call: Call, place: SpanPlace, output: Any) -> None:
        outputs = place.streams.read_outputs(output)
        inputs = call.inputs.pop(place.segment)
        residual = tuple(None if out is None else out - inp for out, inp in zip(outputs, inputs, strict=True))
        self.memory.record(call, ("span", place.segment), residual, inputs)
        call.branch.segments.add(place.segment)

    @torch.compiler.disable
    def _pass_through(self, call: Call, place: SpanPlace, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """On reuse: the block's inputs unchanged, plus the segment's estimated residual at its
        last block. A stream the block returned as None when computed (a last block that drops
        the text tokens) is returned as None again."""
        inputs = place.streams.read_inputs(args, kwargs)
        if not place.closes:
            return place.streams.pack(inputs)
        if place.segment not in call.branch.segments:
            raise StrategyError(
                f"segment {place.segment} of the residual span ran while reusing, but not when the span was "
                "last computed: the model took a different path through its blocks"
            )
        residual = self.memory.estimate(call, ("span", place.segment))
        return place.streams.pack(
            tuple(None if delta is None else value + delta for value, delta in zip(inputs, residual, strict=True))
        )


def _kept_halves(value: Any, batch: int) -> Any:
    if isinstance(value, tuple):
        return tuple(kept_half(item, batch) for item in value)
    return kept_half(value, batch)
