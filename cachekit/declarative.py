"""Adapters built from an `AdapterSpec`: module paths and call conventions instead of code.

Most DiTs differ only in where things are, so most built-in adapters are data: a spec, the model
class and a tiny example (`Example`), declared and registered in two statements:

    FluxAdapter = declare_adapter(FLUX_SPEC, FluxTransformer2DModel, Example(config={...}, latents=(1, 16, 4)))
    cachekit_register_adapters = registering(FluxAdapter)

A family whose probe needs a formula of its own subclasses the declared adapter and overrides
`probe`, nothing else.
"""

from __future__ import annotations

import inspect
import os
import sys
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

from cachekit.adapter import (
    PROBE,
    PROJECTED_TIMESTEP_EMBEDDING,
    TIMESTEP_EMBEDDING,
    Adapter,
    BlockArgument,
    BlockStreams,
    LazyClass,
    ModuleSite,
    OutputSite,
    ResidualSpan,
    Segment,
    SignalSite,
    SignalSource,
    SiteKind,
    call_arg,
)
from cachekit.example import ModelExample
from cachekit.hookspecs import hookimpl
from cachekit.schemas.adapter import (
    AdapterSpec,
    Argument,
    BlockListSpec,
    LatentSpec,
    NormProbe,
    OutputSpec,
    TableProbe,
)
from cachekit.schemas.files import read_table

NO_PROJECTION = "the adapter's spec names no projected timestep embedding (only Wan-style presets read one)"


@dataclass(frozen=True)
class _Block:
    """One block in execution order: its list, its qualified name and its module."""

    spec: BlockListSpec
    name: str
    module: nn.Module


@dataclass(frozen=True)
class Example:
    """A declared adapter's tiny example model, as data: the model class's `config` at a toy size
    (or a function building the model), the latents' shape, random `conditions` of these shapes
    drawn per CFG branch, values given per branch (`branch_values`: conditional, unconditional)
    and `constants` passed to every call. The timestep goes in the way the spec reads it back."""

    config: Mapping[str, Any] | Callable[[], nn.Module]
    latents: tuple[int, ...]
    conditions: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    branch_values: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)
    constants: Mapping[str, Any] = field(default_factory=dict)

    def build(self, adapter: type[DeclarativeAdapter]) -> ModelExample:
        torch.manual_seed(0)  # the weights
        config = self.config
        model = (config() if callable(config) else adapter.model_class(**config)).eval()
        generator = torch.Generator().manual_seed(0)  # the inputs
        spec = adapter.spec.timestep
        per_branch = [
            {name: torch.randn(shape, generator=generator) for name, shape in self.conditions.items()} for _ in range(2)
        ]
        for name, values in self.branch_values.items():
            for branch, value in zip(per_branch, values, strict=True):
                branch[name] = value
        constants = dict(self.constants)

        def inputs(latents: torch.Tensor, t: float, branch: int) -> dict[str, Any]:
            timestep = torch.full((latents.shape[0],), (t - spec.offset) / spec.scale)
            return {"hidden_states": latents, spec.argument.name: timestep, **constants, **per_branch[branch]}

        return ModelExample(model, torch.randn(self.latents, generator=generator), inputs)


def image_ids(height: int, width: int) -> torch.Tensor:
    """Flux-style position ids (0, row, column) of a height x width grid of image tokens."""
    grid = torch.meshgrid(torch.zeros(1), torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    return torch.stack(grid).reshape(3, -1).T


class DeclarativeAdapter(Adapter):
    """An adapter whose points come from `spec`. Subclasses set `spec` and `model_class`, and
    `example_model` to ship a tiny example (see `Example`)."""

    spec: ClassVar[AdapterSpec]
    example_model: ClassVar[Example | None] = None

    @classmethod
    def example(cls) -> ModelExample | None:
        return cls.example_model.build(cls) if cls.example_model is not None else None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is None:
            return
        cls.name = spec.name
        cls.schedule_timesteps = spec.timestep.schedule
        cls.missing = dict(spec.missing)
        cls.missing_attention = {SiteKind(kind): reason for kind, reason in spec.missing_attention.items()}
        own_probe = cls.probe is not DeclarativeAdapter.probe
        if spec.probe is None and not own_probe and PROBE not in cls.missing:
            raise TypeError(f"adapter {spec.name!r}: give a probe (spec or method) or a reason in missing['probe']")
        if spec.timestep_embedding is None and TIMESTEP_EMBEDDING not in cls.missing:
            raise TypeError(f"adapter {spec.name!r}: give timestep_embedding or a reason in missing")
        if spec.projected_timestep_embedding is None and PROJECTED_TIMESTEP_EMBEDDING not in cls.missing:
            cls.missing = {**cls.missing, PROJECTED_TIMESTEP_EMBEDDING: NO_PROJECTION}

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._blocks = self._ordered_blocks()
        self._check_paths()
        self._check_signals()

    # -- structure ------------------------------------------------------------------------------

    def _ordered_blocks(self) -> list[_Block]:
        lists = []
        for block_list in self.spec.blocks:
            modules = cast(nn.ModuleList, self._module(self.model, block_list.path, "block list"))
            lists.append([_Block(block_list, f"{block_list.path}.{i}", module) for i, module in enumerate(modules)])
        if not self.spec.interleave:
            return [block for blocks in lists for block in blocks]
        if len({len(blocks) for blocks in lists}) != 1:
            raise ValueError(f"{self.name}: interleaved block lists differ in length: {[len(b) for b in lists]}")
        return [block for group in zip(*lists, strict=True) for block in group]

    def _check_paths(self) -> None:
        """A path that no block of its list has is a mistake in the spec, not an absent module."""
        for block_list in self.spec.blocks:
            blocks = [block.module for block in self._blocks if block.spec is block_list]
            for path in [*block_list.attention, *block_list.mlp]:
                if all(_find(block, path) is None for block in blocks):
                    raise ValueError(f"{self.name}: no block of {block_list.path!r} has a module {path!r}")

    def _check_signals(self) -> None:
        """Every argument and module the spec names for a signal exists, so a mistake is named when
        the adapter is made, not in the middle of a generation."""
        spec, model, first = self.spec, self.model, self._blocks[0]
        _has_argument(model, spec.timestep.argument, f"{self.name}: timestep")
        _has_argument(model, spec.latent.argument, f"{self.name}: latent")
        for signal in (spec.timestep_embedding, spec.projected_timestep_embedding, *spec.signals.values()):
            if isinstance(signal, OutputSpec):
                self._module(model, signal.module, "signal module")
            elif isinstance(signal, Argument):
                _has_argument(first.module, signal, f"{self.name}: first block's")
        for block in {id(b.spec): b for b in self._blocks}.values():
            for stream in block.spec.streams:
                _has_argument(block.module, stream, f"{self.name}: block list {block.spec.path!r} stream")
        probe = spec.probe
        if isinstance(probe, NormProbe):
            self._module(first.module, probe.module, "probe norm of the first block")
            for argument in probe.arguments.values():
                _has_argument(first.module, argument, f"{self.name}: probe")
        elif isinstance(probe, TableProbe):
            self._module(first.module, probe.norm, "probe norm of the first block")
            if not isinstance(getattr(first.module, probe.table, None), torch.Tensor):
                raise ValueError(
                    f"{self.name}: the probe's table {probe.table!r} is not a tensor of the first block "
                    f"({type(first.module).__name__}); name its modulation table"
                )
            _has_argument(first.module, probe.embedding, f"{self.name}: probe embedding")

    def _module(self, root: nn.Module, path: str, what: str) -> nn.Module:
        try:
            return root.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"{self.name}: {type(root).__name__} has no {what} {path!r}; "
                f"its children are {', '.join(name for name, _ in root.named_children())}"
            ) from None

    def blocks(self) -> list[nn.Module]:
        return [block.module for block in self._blocks]

    def span(self) -> ResidualSpan:
        """A new segment starts wherever the model may re-lay the tokens between two blocks, as
        the lists declare it: at every block, at the list's start, or never."""
        segments: list[Segment] = []
        for index, block in enumerate(self._blocks):
            entry = (block.module, _streams(block.spec))
            before = self._blocks[index - 1].spec if index else None
            joins = before is not None and (
                (block.spec.residual == "list" and block.spec is before)
                or (block.spec.residual == "span" and before.residual == "span")
            )
            if joins:
                segments[-1] = (*segments[-1], entry)
            else:
                segments.append((entry,))
        return ResidualSpan(tuple(segments))

    def attention_sites(self) -> list[ModuleSite]:
        return self._sites(lambda spec: {path: SiteKind(kind) for path, kind in spec.attention.items()})

    def mlp_sites(self) -> list[ModuleSite]:
        return self._sites(lambda spec: dict.fromkeys(spec.mlp, SiteKind.MLP))

    def _sites(self, kinds_of: Any) -> list[ModuleSite]:
        sites = []
        for index, block in enumerate(self._blocks):
            for path, kind in kinds_of(block.spec).items():
                module = _find(block.module, path)
                if module is not None:
                    sites.append(ModuleSite(f"{block.name}.{path}", module, kind, index, path in block.spec.gates))
        return sites

    def gate(self, site: ModuleSite, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        block = self._blocks[site.block]
        spec = block.spec.gates[site.name.removeprefix(f"{block.name}.")]
        embedding = _argument(args, kwargs, spec.embedding)
        table = getattr(block.module, spec.table)
        rows = table.reshape(1, spec.rows, -1) + embedding.reshape(embedding.shape[0], spec.rows, -1)
        return rows[:, spec.row : spec.row + 1]

    # -- signals --------------------------------------------------------------------------------

    def timestep(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        spec = self.spec.timestep
        return spec.offset + spec.scale * _argument(args, kwargs, spec.argument)

    def scheduled(self, value: float) -> float:
        spec = self.spec.timestep
        return spec.offset + spec.scale * value if spec.schedule == "argument" else value

    def latent_input(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        return _argument(args, kwargs, self.spec.latent.argument)

    def latent(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        return _laid_out(self.spec.latent, self.latent_input(args, kwargs), args, kwargs, self.name)

    def signals(self) -> dict[str, SignalSource]:
        """The built-in signals, and those the spec declares."""
        return {**super().signals(), **{name: self._signal_site(spec) for name, spec in self.spec.signals.items()}}

    def timestep_embedding(self) -> SignalSite:
        return self._signal_site(self.spec.timestep_embedding)

    def projected_timestep_embedding(self) -> SignalSite:
        return self._signal_site(self.spec.projected_timestep_embedding)

    def _signal_site(self, spec: OutputSpec | Argument | None) -> SignalSite:
        assert spec is not None  # declared missing otherwise
        if isinstance(spec, Argument):
            return BlockArgument(spec.position, spec.name)
        return OutputSite(self.model.get_submodule(spec.module), spec.index)

    def probe(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        first = self._blocks[0]
        hidden_states = _argument(args, kwargs, first.spec.streams[0])
        probe = self.spec.probe
        if isinstance(probe, NormProbe):
            norm = first.module.get_submodule(probe.module)
            extra = {key: _argument(args, kwargs, arg) for key, arg in probe.arguments.items()}
            if probe.dtype_argument is not None:
                extra[probe.dtype_argument] = hidden_states.dtype
            output = norm(hidden_states, **extra)
            return output if probe.index is None else output[probe.index]
        assert isinstance(probe, TableProbe)  # declared missing otherwise
        return _table_modulation(first.module, probe, hidden_states, _argument(args, kwargs, probe.embedding))


def _table_modulation(
    block: nn.Module, probe: TableProbe, hidden_states: torch.Tensor, embedding: torch.Tensor
) -> torch.Tensor:
    """norm(h) * (1 + scale) + shift, the way table-modulated blocks compute it.

    The projected timestep comes per sample (batch, rows * dim) or (batch, rows, dim), or per token
    (batch, tokens, rows * dim) or (batch, tokens, rows, dim); the table is (rows, dim), maybe
    with leading ones.
    """
    table = getattr(block, probe.table)
    rows, dim = table.shape[-2:]
    if embedding.ndim < 2 or embedding.shape[-2:] != (rows, dim):
        embedding = embedding.unflatten(-1, (rows, dim))
    if probe.float32:
        hidden_states, embedding = hidden_states.float(), embedding.float()
    modulation = table.reshape(rows, dim) + embedding
    shift, scale = modulation[..., probe.shift, :], modulation[..., probe.scale, :]
    if shift.ndim == 2:  # per sample: broadcast over the tokens
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    normed = block.get_submodule(probe.norm)(hidden_states)
    return normed * (1 + scale) + shift


def _laid_out(
    spec: LatentSpec, latent: torch.Tensor, args: tuple[Any, ...], kwargs: Mapping[str, Any], adapter: str
) -> torch.Tensor:
    """`latent` as (batch, channels, frames, height, width)."""
    layout = spec.layout or {5: "BCTHW", 4: "BCHW"}.get(latent.ndim)
    if layout is None or len(layout) != latent.ndim:
        raise ValueError(
            f"adapter {adapter!r}: its latent has shape {tuple(latent.shape)}, which does not fit the layout "
            f"{layout or 'BCTHW or BCHW'}; declare the layout in its spec"
        )
    if layout == "BCTHW":
        return latent
    if layout == "BCHW":
        return latent.unsqueeze(2)
    if layout == "BTCHW":
        return latent.transpose(1, 2)
    # packed tokens as B, C, T, N: frames of them (BTNC), or one frame (BNC)
    latent = latent.permute(0, 3, 1, 2) if layout == "BTNC" else latent.transpose(1, 2).unsqueeze(2)
    if spec.grid is not None:
        sizes = [int(_argument(args, kwargs, argument)) for argument in spec.grid]
        return latent.reshape(*latent.shape[:2], -1, *sizes[-2:])
    if spec.ids is not None:
        return _placed(latent.squeeze(2), _argument(args, kwargs, spec.ids))
    return latent.unsqueeze(-1)  # the tokens as one axis


def _placed(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Tokens (batch, channels, tokens) put on the grid their (frame, row, column) ids name."""
    index, sizes = _placement(ids)
    grid = tokens.new_zeros(*tokens.shape[:2], sizes[0] * sizes[1] * sizes[2])
    grid[..., index] = tokens
    return grid.unflatten(-1, sizes)


#: The last ids placed and their placement: a pipeline passes the same ids tensor at every call,
#: and reading the grid's size from the device is a host sync.
_LAST_PLACEMENT: list[Any] = [None, None]


def _placement(ids: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Each token's position in the grid its ids span, and the grid's (frames, height, width)."""
    last = _LAST_PLACEMENT[0]() if _LAST_PLACEMENT[0] is not None else None
    if last is ids and ids._version == _LAST_PLACEMENT[1][0]:
        return _LAST_PLACEMENT[1][1]
    positions = (ids[0] if ids.ndim == 3 else ids).round().long()
    positions = positions - positions.min(dim=0).values
    frames, height, width = (int(size) + 1 for size in positions.max(dim=0).values.tolist())
    placement = ((positions[:, 0] * height + positions[:, 1]) * width + positions[:, 2], (frames, height, width))
    _LAST_PLACEMENT[:] = [weakref.ref(ids), (ids._version, placement)]
    return placement


def _streams(spec: BlockListSpec) -> BlockStreams:
    inputs = tuple((arg.position, arg.name) for arg in spec.streams)
    return BlockStreams(inputs, None if spec.returns is None else tuple(spec.returns))


def _argument(args: tuple[Any, ...], kwargs: Mapping[str, Any], argument: Argument) -> Any:
    return call_arg(args, kwargs, argument.position, argument.name)


def _has_argument(module: nn.Module, argument: Argument, what: str) -> None:
    """`module`'s forward takes `argument` (by name, or at its position; any, with **kwargs)."""
    parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]  # without self
    names = [parameter.name for parameter in parameters]
    takes_any = any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters)
    at_position = argument.position is not None and argument.position < len(names) and names[argument.position]
    if argument.name in names or takes_any:
        if at_position and at_position != argument.name and argument.name in names:
            raise ValueError(
                f"{what} argument {argument.name!r} is parameter {names.index(argument.name)} of "
                f"{type(module).__name__}.forward, not {argument.position} (position {argument.position} is "
                f"{at_position!r})"
            )
        return
    raise ValueError(
        f"{what} argument {argument.name!r} is not a parameter of {type(module).__name__}.forward; "
        f"its parameters: {', '.join(names)}"
    )


def _find(block: nn.Module, path: str) -> nn.Module | None:
    """The submodule at `path`, or None where this block has none (e.g. a last block without one)."""
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def declare_adapter(
    spec: AdapterSpec | Mapping[str, Any] | str | os.PathLike[str],
    model_class: type[nn.Module] | str,
    example: Example | None = None,
) -> type[DeclarativeAdapter]:
    """An adapter class for `model_class` (the class, or its import path, "diffusers.FluxTransformer2DModel",
    imported when first used) from a spec (object, dict, or TOML/JSON file), with a tiny `example`
    model for the conformance tests.

    Register it like any adapter: ``register(declare_adapter(spec, MyDiT))`` in a plugin's
    ``cachekit_register_adapters`` hook (or ``cachekit_register_adapters = registering(...)``),
    or ``cachekit.register_plugin``. A relative file path is taken from the folder of the module
    that calls this (so a plugin package finds the spec it ships wherever it is installed), else
    from the working directory.
    """
    if isinstance(spec, str | os.PathLike):
        path = Path(spec)
        beside_caller = Path(sys._getframe(1).f_code.co_filename).parent / path
        spec = read_table(beside_caller if not path.is_absolute() and beside_caller.is_file() else path)
    spec = AdapterSpec.model_validate(spec)
    class_name = "".join(part.title() for part in spec.name.split("_")) + "Adapter"
    declared = LazyClass(model_class) if isinstance(model_class, str) else model_class
    fields = {"spec": spec, "model_class": declared, "example_model": example, "__module__": _caller_module()}
    return type(class_name, (DeclarativeAdapter,), fields)


def registering(*adapters: type[Adapter]) -> Callable[[Callable[[type[Adapter]], None]], None]:
    """A module's `cachekit_register_adapters` hook registering `adapters`: assign it to that name."""

    @hookimpl
    def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
        for adapter in adapters:
            register(adapter)

    return cachekit_register_adapters


def _caller_module() -> str:
    """The module that declared the adapter (two frames up), for its class's `__module__`."""
    return str(sys._getframe(2).f_globals.get("__name__", __name__))
