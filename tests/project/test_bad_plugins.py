"""Plugins that are wrong are reported by name, and the others load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
import pytest
import torch
from diffusers import FluxTransformer2DModel
from helpers import flux_inputs

import cachekit
from cachekit.hookspecs import hookimpl
from cachekit.registry import PluginWarning
from cachekit.schemas import (
    StrategyConfig,
)
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


class _NoneDecision(StrategyConfig):
    strategy: Literal["forgets_return"] = "forgets_return"


def register_strategy_class(config_class: type[StrategyConfig], decide: Any) -> None:
    class Strategy(cachekit.Strategy):  # type: ignore[type-arg]
        requires = frozenset({cachekit.Place.SPAN})

        def decide_span(self, step, signals, state):
            return decide(step)

    Strategy.config_class = config_class

    class Plugin:
        @hookimpl
        def cachekit_register_strategies(self, register):
            register(Strategy)

    cachekit.register_plugin(Plugin(), f"test-{config_class.registered_name()}")


def plugin_warning(registers: Any, name: str) -> None:
    class Plugin:
        @hookimpl
        def cachekit_register_strategies(self, register):
            registers(register)

    cachekit.register_plugin(Plugin(), name)


def _no_fixed_name(register: Any) -> None:
    class Loose(StrategyConfig):
        strategy: str = Field(default=None)  # type: ignore[assignment]

    class Strategy(cachekit.Strategy):  # type: ignore[type-arg]
        config_class = Loose

    register(Strategy)


from pydantic import Field  # noqa: E402  (used by the plugin defined above)


@pytest.mark.parametrize(
    ("register", "name", "message"),
    [
        (
            lambda r: r(dict),
            "not-a-strategy",
            r"'not-a-strategy' failed to load: .*registered <class 'dict'>, which is not a Strategy",
        ),
        (
            lambda r: r(cachekit.get_strategy("uniform")),
            "claims-uniform",
            r"plugin 'claims-uniform' registers strategy 'uniform', which plugin 'uniform' already registered",
        ),
        (_no_fixed_name, "loose-name", r"Loose must fix its strategy name: strategy: Literal\['my_name'\] = 'my_name'"),
    ],
)
def test_bad_plugins_are_reported_by_name_and_the_others_load(fresh_registry, register, name, message):
    with pytest.warns(PluginWarning, match=message):
        plugin_warning(register, name)
    assert name in cachekit.plugin_errors() and "uniform" in cachekit.list_strategies()


class _Misspelt:
    @hookimpl
    def cachekit_register_strategy(self, register):  # the hook is cachekit_register_strategies
        raise AssertionError("never called")


class _Unmarked:
    def cachekit_register_strategies(self, register):  # no @hookimpl
        raise AssertionError("never called")


class _Empty:
    pass


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (
            _Misspelt(),
            r"'misspelt' failed to load: 'cachekit_register_strategy' is no cachekit hook \(did you mean "
            r"'cachekit_register_strategies'\?\); the hooks are: cachekit_register_strategies, ",
        ),
        (
            _Unmarked(),
            r"'unmarked' failed to load: cachekit_register_strategies is not marked @cachekit\.hookimpl, so "
            r"cachekit never calls it",
        ),
        (_Empty(), r"'empty' failed to load: it implements no cachekit hook \(cachekit_register_strategies, .*\)"),
    ],
    ids=["misspelt hook", "hook without hookimpl", "no hook"],
)
def test_a_plugin_that_adds_nothing_is_named(fresh_registry, plugin, message):
    name = type(plugin).__name__.strip("_").lower()
    with pytest.warns(PluginWarning, match=message):
        cachekit.register_plugin(plugin, name)
    assert name in cachekit.plugin_errors() and "uniform" in cachekit.list_strategies()
