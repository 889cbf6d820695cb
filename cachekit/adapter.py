"""The Adapter contract: where one model family keeps the points a cache strategy works on.

An adapter never changes the model. It names modules (blocks, attention) and reads values out of
the calls the model makes anyway, so the runtime can hook module boundaries instead of copying the
model's forward.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import torch
from torch import nn

from cachekit.errors import MissingPointError, UnsupportedModelError
from cachekit.example import ModelExample

Streams = tuple[torch.Tensor, ...]


class Place(StrEnum):
    """Where in the model a strategy can skip work."""

    SPAN = "span"  # the run of blocks whose residual can be cached
    ATTENTION = "attention"  # attention modules with their kind
    MLP = "mlp"  # the blocks' feed-forward modules


#: The signals every adapter exposes where its model has them, by name: what a strategy decides
#: from. An adapter may expose more (`Adapter.signals`); a strategy asks for any by name.
PROBE = "probe"  # the first block's timestep-modulated input
TIMESTEP_EMBEDDING = "timestep_embedding"  # the timestep embedding the blocks are conditioned on
PROJECTED_TIMESTEP_EMBEDDING = "projected_timestep_embedding"  # it, projected into modulation parameters
LATENT = "latent"  # the noisy latent of the call, laid out (batch, channels, frames, height, width)
OUTPUT = "output"  # the prediction the call returns, handed to `Strategy.observe`


class SiteKind(StrEnum):
    """What a module-level site computes; attention sites differ in how fast they change."""

    SPATIAL = "spatial"
    TEMPORAL = "temporal"
    CROSS = "cross"
    MLP = "mlp"


@dataclass(frozen=True)
class ModuleSite:
    """A module whose output a strategy may reuse (an attention or an MLP)."""

    name: str  # the module's qualified name inside the transformer
    module: nn.Module
    kind: SiteKind
    block: int  # index of its block in `Adapter.blocks()`
    gated: bool = False  # the block multiplies the output by a gate (`Adapter.gate`) before adding it


@dataclass(frozen=True)
class OutputSite:
    """A module whose output, or one item of its output tuple, is a signal."""

    module: nn.Module
    index: int | None = None

    def read(self, output: Any) -> torch.Tensor:
        return output if self.index is None else output[self.index]


@dataclass(frozen=True)
class BlockArgument:
    """An argument of the first block's calls that is a signal: the embedding the blocks get, where
    the model sums it from several modules and no module outputs it whole."""

    position: int | None
    name: str

    def read(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        return call_arg(args, kwargs, self.position, self.name)


@dataclass(frozen=True)
class FirstBlockSignal:
    """A signal computed from the first block's call arguments, before the block runs (the probe)."""

    read: Callable[[tuple[Any, ...], Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class CallSignal:
    """A signal read from the transformer call's own arguments, before any diffusers hook splits
    them (the latent)."""

    read: Callable[[tuple[Any, ...], Mapping[str, Any]], torch.Tensor]


#: Where an embedding signal comes from.
SignalSite = OutputSite | BlockArgument
#: Where any signal comes from: a module's output, a first block's argument or a value made from
#: its arguments, or the call's arguments.
SignalSource = OutputSite | BlockArgument | FirstBlockSignal | CallSignal


def call_arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], position: int | None, name: str) -> Any:
    """An argument of a call, whether it was passed by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    if position is not None and position < len(args):
        return args[position]
    raise TypeError(f"the call has no argument {name!r} (position {position})")


@dataclass(frozen=True)
class BlockStreams:
    """How one kind of block takes and returns the streams the span carries.

    `inputs` gives (position, keyword) of each stream in the block's call, in the span's stream
    order; `outputs` gives the index of each stream in the returned tuple, or None when the block
    returns its single stream as a bare tensor.
    """

    inputs: tuple[tuple[int | None, str], ...]
    outputs: tuple[int, ...] | None = None

    def read_inputs(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Streams:
        return tuple([kwargs[name] if name in kwargs else call_arg(args, kwargs, at, name) for at, name in self.inputs])

    def read_outputs(self, output: Any) -> Streams:
        if self.outputs is None:
            if not isinstance(output, torch.Tensor):
                raise UnsupportedModelError(
                    f"a block returned a {type(output).__name__}, but its adapter says it returns its one stream as a "
                    "tensor: give the position of each stream in what it returns (a spec's 'returns')"
                )
            return (output,)
        if not isinstance(output, tuple | list) or len(output) != len(self.outputs):
            got = f"a tuple of {len(output)}" if isinstance(output, tuple | list) else f"a {type(output).__name__}"
            raise UnsupportedModelError(
                f"a block returned {got}, but its adapter says it returns a tuple of its {len(self.outputs)} streams "
                f"(at {list(self.outputs)}): leave a spec's 'returns' unset for a block that returns its one stream"
            )
        return tuple([output[index] for index in self.outputs])

    def passed(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """The block's inputs, returned the way it returns them (`pack(read_inputs(...))` in one)."""
        if self.outputs is None:
            at, name = self.inputs[0]
            return kwargs[name] if name in kwargs else call_arg(args, kwargs, at, name)
        return tuple([kwargs[name] if name in kwargs else call_arg(args, kwargs, at, name) for at, name in self._order])

    @functools.cached_property
    def _order(self) -> tuple[tuple[int | None, str], ...]:
        """The input each output slot returns."""
        assert self.outputs is not None
        slots = dict(zip(self.outputs, self.inputs, strict=True))
        return tuple(slots[index] for index in range(len(self.outputs)))

    def pack(self, streams: tuple[torch.Tensor | None, ...]) -> Any:
        """Shape `streams` the way the block returns them."""
        if self.outputs is None:
            return streams[0]
        packed: list[torch.Tensor | None] = [None] * len(self.outputs)
        for stream, index in zip(streams, self.outputs, strict=True):
            packed[index] = stream
        return tuple(packed)


Segment = tuple[tuple[nn.Module, BlockStreams], ...]


@dataclass(frozen=True)
class ResidualSpan:
    """The blocks whose total effect (output minus input, per stream) span-level strategies cache.

    The blocks run in order, grouped in segments: runs of blocks between which the model does not
    touch the streams. Each segment caches its own residual, so a model that reshapes the tokens
    between blocks (Latte's spatial/temporal alternation) is still one span, decided once.
    """

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if not self.segments or not all(self.segments):
            raise ValueError("a residual span needs at least one block, and no segment may be empty")

    @property
    def blocks(self) -> Segment:
        return tuple(block for segment in self.segments for block in segment)


class LazyClass:
    """A model class named by its import path ("diffusers.FluxTransformer2DModel"), imported the
    first time an adapter uses it: loading the registry (`cachekit list`) then imports no model
    library, and a model is told apart by its classes' names before anything is imported."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = path.rpartition(".")[2]
        self._class: type[nn.Module] | None = None

    def __get__(self, instance: object, owner: type | None = None) -> type[nn.Module]:
        if self._class is None:
            module, _, name = self.path.rpartition(".")
            self._class = getattr(importlib.import_module(module), name)
        return self._class

    def named_in(self, model: nn.Module) -> bool:
        """Whether a class of `model` (its own or a base) has this name: the cheap check first."""
        return any(klass.__name__ == self.name for klass in type(model).__mro__)


def model_class_name(adapter: type[Adapter]) -> str:
    """The name of the class `adapter` supports, without importing it."""
    declared = inspect.getattr_static(adapter, "model_class")
    return declared.name if isinstance(declared, LazyClass) else declared.__name__


class Adapter:
    """Base class of model-family adapters.

    Subclasses set `name` and `model_class`, implement the points their model has, and list in
    `missing` the points it lacks with the reason, so a strategy needing one fails at attach time,
    and in `missing_attention` the kinds of attention it lacks, with the reason.
    """

    name: ClassVar[str]
    model_class: ClassVar[type[nn.Module]]
    #: Places and signals the model lacks, by name, each with the reason.
    missing: ClassVar[Mapping[str, str]] = {}
    missing_attention: ClassVar[Mapping[SiteKind, str]] = {}
    #: How pipelines' scheduler timesteps relate to the model's (`timestep`): "timestep" they are the
    #: same, "argument" they are what the model is called with (`scheduled` maps them), "call"
    #: neither (each call's is read from the device); None: unknown, the first call's is read to see.
    schedule_timesteps: ClassVar[str | None] = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter knows `model`. Override where variants of a class differ."""
        declared = inspect.getattr_static(cls, "model_class")
        if isinstance(declared, LazyClass) and not declared.named_in(model):
            return False
        return isinstance(model, cls.model_class)

    @classmethod
    def provides(cls, point: str) -> bool:
        """Whether the model has the place or signal `point` (the adapter does not list it missing)."""
        return point not in cls.missing

    def identity(self) -> str:
        """The adapter and a fingerprint of the model's config: what a calibration was fitted on.

        Only the config values that shape the model count; diffusers' bookkeeping (`_name_or_path`,
        `_use_default_values`, whose order even varies between processes) does not."""
        config = {
            key: value for key, value in dict(getattr(self.model, "config", {})).items() if not key.startswith("_")
        }
        text = json.dumps(config, sort_keys=True, default=str)
        return f"{self.name}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def require(self, point: str, strategy_name: str) -> None:
        """Fail with a message naming the place or signal, the model and the strategy if the
        adapter does not expose `point`."""
        reason = self.missing.get(point)
        if reason is None and point not in (*Place, OUTPUT) and point not in self.signals():
            reason = f"it exposes no such signal; its signals: {', '.join(self.signals()) or 'none'}"
        if reason is not None:
            raise MissingPointError(
                f"strategy {strategy_name!r} needs the {str(point)!r} point, which the {self.name!r} adapter does not "
                f"provide for {type(self.model).__name__}: {reason}"
            )

    def signals(self) -> dict[str, SignalSource]:
        """The signals the model exposes, by name: the built-in ones it has (from `probe`,
        `timestep_embedding`, `projected_timestep_embedding` and `latent`). A new signal is an
        entry here (or in a declared adapter's spec), read by the strategy that asks for it."""
        sources: dict[str, Any] = {
            PROBE: lambda: FirstBlockSignal(self.probe),
            TIMESTEP_EMBEDDING: self.timestep_embedding,
            PROJECTED_TIMESTEP_EMBEDDING: self.projected_timestep_embedding,
            LATENT: lambda: CallSignal(self.latent),
        }
        return {name: source() for name, source in sources.items() if name not in self.missing}

    @classmethod
    def example(cls) -> ModelExample | None:
        """A tiny random instance of the model, so the conformance tests cover this adapter."""
        return None

    # -- points ---------------------------------------------------------------------------------

    def timestep(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The timestep of a transformer call on the 0-1000 training scale, from its arguments."""
        raise NotImplementedError

    def step_of(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> float:
        """The call's timestep as one number (the largest, where samples or tokens have their own)."""
        timestep = self.timestep(args, kwargs)
        if not isinstance(timestep, torch.Tensor):
            return float(timestep)
        if timestep.ndim > 2:
            raise ValueError(
                f"adapter {self.name!r}: the timestep argument of this {type(self.model).__name__} call is a tensor "
                f"of shape {tuple(timestep.shape)}, not a timestep (one value per sample, or per sample and token): "
                "the adapter reads the wrong argument"
            )
        return float(timestep.max())

    def scheduled(self, value: float) -> float:
        """A scheduler timestep of the model's pipelines on the scale `timestep` reads."""
        return value

    def latent_input(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The noisy latent argument of a call, as passed (`latent` lays it out)."""
        return call_arg(args, kwargs, 0, "hidden_states")

    def latent(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The noisy latent of a transformer call, laid out (batch, channels, frames, height, width)."""
        raise NotImplementedError

    def prediction(self, output: Any) -> torch.Tensor:
        """The prediction a transformer call returned (diffusers: a tuple, or an output object)."""
        return output[0] if isinstance(output, tuple) else output.sample

    def timestep_embedding(self) -> SignalSite:
        """Where the timestep embedding the blocks are conditioned on comes out."""
        raise NotImplementedError

    def projected_timestep_embedding(self) -> SignalSite:
        """Where that embedding, projected into the blocks' modulation parameters, comes out."""
        raise NotImplementedError

    def span(self) -> ResidualSpan:
        raise NotImplementedError

    def probe(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The first span block's timestep-modulated input, from that block's call arguments."""
        raise NotImplementedError

    def attention_sites(self) -> list[ModuleSite]:
        raise NotImplementedError

    def gate(self, site: ModuleSite, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The gate the block applies to a gated site's output, from the block's call arguments."""
        raise NotImplementedError

    def mlp_sites(self) -> list[ModuleSite]:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """Every transformer block, in execution order."""
        return [block for block, _ in self.span().blocks]
