"""What the bad-input tables (strategies, adapters, studies, plugins) build their cases from: a
declared adapter on a tiny Flux, study specs, and plugins registered for one test."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
from diffusers import FluxTransformer2DModel
from helpers import flux_inputs
from pydantic import Field

import cachekit
from cachekit.hookspecs import hookimpl
from cachekit.schemas import StrategyConfig
from cachekit.study import load_spec, run_study
from cachekit.testing import tiny_flux_transformer

V = pydantic.ValidationError
FLUX_BLOCKS = {"path": "transformer_blocks", "streams": [{"name": "hidden_states", "position": 0}]}


class VariantFlux(FluxTransformer2DModel):
    """A subclass, so the spec's adapter (registered for it) wins over the built-in Flux one."""


def declare(**changes: Any) -> Any:
    """Register the adapter of a spec for a tiny Flux (one list: its double blocks) and make it."""
    spec = {
        "name": "flux_variant",
        "timestep": {"argument": {"name": "timestep", "position": 3}, "scale": 1000},
        "timestep_embedding": {"module": "time_text_embed"},
        "blocks": [
            {
                "path": "transformer_blocks",
                "streams": [{"name": "hidden_states", "position": 0}, {"name": "encoder_hidden_states", "position": 1}],
                "returns": [1, 0],
                "attention": {"attn": "spatial"},
            }
        ],
        "probe": {"kind": "norm", "arguments": {"emb": {"name": "temb", "position": 2}}},
        **changes,
    }
    adapter = cachekit.declare_adapter(spec, VariantFlux)

    class Plugin:
        @hookimpl
        def cachekit_register_adapters(self, register):
            register(adapter)

    cachekit.register_plugin(Plugin(), f"variant-{id(adapter)}")
    model = tiny_flux_transformer()
    model.__class__ = VariantFlux
    return adapter(model)


def run_bare(model: torch.nn.Module, config: Any, timesteps: list[float]) -> None:
    with cachekit.apply(model, config):
        for timestep in timesteps:
            model(**flux_inputs(timestep=timestep))


def study_spec(tmp: Path, text: str) -> Path:
    path = tmp / "spec.toml"
    path.write_text(text)
    return path


BASE_STUDY = 'models = ["flux-digits"]\nlabels = [1]\nsteps = 4\nrepeats = 1\nwarmup = 0\n'


def run_spec(tmp: Path, text: str) -> None:
    run_study(load_spec(study_spec(tmp, BASE_STUDY + text)), tmp / "results.sqlite", progress=False)


class NoneDecision(StrategyConfig):
    strategy: Literal["forgets_return"] = "forgets_return"


def register_strategy_class(config_class: type[StrategyConfig], decide: Any) -> None:
    class Strategy(cachekit.Strategy):  # type: ignore[type-arg]
        requires = frozenset({cachekit.Place.SPAN})

        def decide_span(self, step, signals, state):
            return decide(step)

    Strategy.config_class = config_class
    strategies_plugin(lambda register: register(Strategy), f"test-{config_class.registered_name()}")


def strategies_plugin(registers: Any, name: str) -> None:
    """A plugin `name` whose strategies hook calls `registers(register)`."""

    class Plugin:
        @hookimpl
        def cachekit_register_strategies(self, register):
            registers(register)

    cachekit.register_plugin(Plugin(), name)


def no_fixed_name(register: Any) -> None:
    class Loose(StrategyConfig):
        strategy: str = Field(default=None)  # type: ignore[assignment]

    class Strategy(cachekit.Strategy):  # type: ignore[type-arg]
        config_class = Loose

    register(Strategy)
