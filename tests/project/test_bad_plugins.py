"""Plugins that are wrong are reported by name, and the others load."""

from __future__ import annotations

import pytest
from bad_input import no_fixed_name, strategies_plugin

import cachekit
from cachekit.hookspecs import hookimpl
from cachekit.registry import PluginWarning


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
            r"plugin 'claims-uniform' registers strategy 'uniform', which plugin 'cachekit.strategies.uniform' "
            "already registered",
        ),
        (no_fixed_name, "loose-name", r"Loose must fix its strategy name: strategy: Literal\['my_name'\] = 'my_name'"),
    ],
)
def test_bad_plugins_are_reported_by_name_and_the_others_load(fresh_registry, register, name, message):
    with pytest.warns(PluginWarning, match=message):
        strategies_plugin(register, name)
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
