"""The plugin registry: built-ins and third-party plugins take the same path."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, TESTS

import cachekit
from cachekit.errors import UnknownStrategyError
from cachekit.hookspecs import hookimpl
from cachekit.registry import PluginWarning, Registry
from cachekit.schemas import UniformConfig
from cachekit.testing import run_flux

PLUGINS = TESTS / "plugins"


def test_builtins_are_entry_point_plugins():
    """One entry point per package; each module of the package is a plugin of its own."""
    found = {entry_point.name: entry_point.value for entry_point in importlib.metadata.entry_points(group="cachekit")}
    packages = {name: found[name] for name in ("strategies", "estimators", "adapters", "metrics")}
    assert packages == {name: f"cachekit.{name}" for name in packages}
    assert not [value for value in found.values() if value.startswith("cachekit.") and value not in packages.values()]
    assert "uniform" in cachekit.list_strategies()
    assert {"flux", "wan"} <= set(cachekit.list_adapters())
    assert cachekit.get_strategy("uniform").config_class is UniformConfig


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(UnknownStrategyError, match=r"unknown strategy 'teacash'; known strategies: .*uniform"):
        cachekit.get_strategy("teacash")


def test_register_plugin_from_code_then_apply(fresh_registry, flux_pipe):
    from strategies_for_tests import EveryThird

    class Plugin:
        @hookimpl
        def cachekit_register_strategies(self, register):
            register(EveryThird)

    cachekit.register_plugin(Plugin(), "every-third-plugin")
    assert "every_third" in cachekit.list_strategies()
    with cachekit.apply(flux_pipe, {"strategy": "every_third"}) as handle:
        run_flux(flux_pipe, steps=7)
    assert handle.stats.last.branches[0].span_schedule == [True, False, False, True, False, False, True]


def test_failing_hook_and_duplicate_name_are_reported_by_plugin_name(fresh_registry):
    class Raises:
        @hookimpl
        def cachekit_register_strategies(self, register):
            raise RuntimeError("boom")

    class ClaimsUniform:
        @hookimpl
        def cachekit_register_strategies(self, register):
            register(cachekit.get_strategy("uniform"))

    class NotAStrategy:
        @hookimpl
        def cachekit_register_strategies(self, register):
            register(dict)

    with pytest.warns(PluginWarning, match="'raises' failed to load: .*boom"):
        cachekit.register_plugin(Raises(), "raises")
    with pytest.warns(
        PluginWarning,
        match="plugin 'claims-uniform' registers strategy 'uniform', which plugin 'cachekit.strategies.uniform'",
    ):
        cachekit.register_plugin(ClaimsUniform(), "claims-uniform")
    with pytest.warns(PluginWarning, match="not a Strategy subclass"):
        cachekit.register_plugin(NotAStrategy(), "not-a-strategy")
    errors = cachekit.plugin_errors()
    assert set(errors) == {"raises", "claims-uniform", "not-a-strategy"}
    assert "uniform" in cachekit.list_strategies()  # the others still load


def test_installed_third_party_plugin_works_and_a_broken_one_is_reported(tmp_path):
    """Install two real plugin packages (one raises at import) and use them in a fresh process."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(PLUGINS / "alternate"),
            str(PLUGINS / "broken"),
        ],
        check=True,
        capture_output=True,
    )
    script = textwrap.dedent(
        """
        import json, warnings
        warnings.simplefilter("ignore")
        import cachekit
        from cachekit.testing import run_flux, tiny_flux_pipeline

        pipe = tiny_flux_pipeline()
        with cachekit.apply(pipe, {"strategy": "alternate", "offset": 1}) as handle:
            run_flux(pipe, steps=6)
        print(json.dumps({
            "strategies": cachekit.list_strategies(),
            "adapters": cachekit.list_adapters(),
            "errors": cachekit.plugin_errors(),
            "schedule": handle.stats.last.branches[1].span_schedule,
            "config": handle.strategy.config.model_dump(),
        }))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"alternate", "uniform"} <= set(report["strategies"])
    assert {"flux", "wan"} <= set(report["adapters"])
    assert list(report["errors"]) == ["broken"]
    assert "cachekit_broken needs a library that is not installed" in report["errors"]["broken"]
    assert report["schedule"] == [True, True, False, True, False, True]
    assert report["config"]["offset"] == 1


def test_the_documented_estimator_is_the_installable_test_plugin():
    """The plugins page's estimator is the package the conformance matrix installs, word for word."""
    readme = (ROOT / "docs" / "plugins.md").read_text()
    start = readme.index("# cachekit_damped/__init__.py\n")
    snippet = readme[start : readme.index("```", start)].split("\n", 1)[1]
    assert snippet in (PLUGINS / "damped" / "cachekit_damped" / "__init__.py").read_text()


def test_a_plugin_author_runs_the_shipped_conformance_matrix_without_a_checkout(tmp_path):
    """`pytest --pyargs cachekit.conformance` from anywhere: the installed estimator plugin's cells
    run on every adapter."""
    command = [sys.executable, "-m", "pytest", "--pyargs", "cachekit.conformance", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run([*command, "-k", "damped and (flux or wan)"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"\b[1-9]\d* passed", result.stdout) and "failed" not in result.stdout


#: A method as the two files docs/plugins.md shows: its config and its strategy.
EVERY_FOURTH = TESTS / "data" / "every_fourth"


def test_a_built_in_method_is_one_strategy_module_and_one_schema_module(tmp_path, monkeypatch, request):
    """Dropped into the two folders (here: folders added to the packages' paths), a method is a
    strategy everywhere the project runs "every strategy": the registry, the schemas' exports,
    the conformance matrix, the compile and context-parallel lists and the benchmarks."""
    import sys

    import cachekit.schemas
    import cachekit.strategies
    from cachekit import conformance
    from cachekit import registry as registry_module

    for package in (cachekit.schemas, cachekit.strategies):
        folder = EVERY_FOURTH / package.__name__.rsplit(".", 1)[-1]
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])

    @request.addfinalizer
    def forget() -> None:  # the method is gone again after the test
        for module in ("cachekit.schemas.every_fourth", "cachekit.strategies.every_fourth"):
            sys.modules.pop(module, None)
        vars(cachekit.schemas).pop("EveryFourthConfig", None)

    fresh = Registry()
    fresh.load_entry_points()
    monkeypatch.setattr(registry_module, "registry", lambda: fresh)
    assert not fresh.errors

    assert cachekit.schemas.EveryFourthConfig.registered_name() == "every_fourth"
    assert "every_fourth" in cachekit.list_strategies()
    assert ("every_fourth", "copy", "float32") in conformance.cells()
    assert ("every_fourth", "copy", "bfloat16") in conformance.cells()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import context_parallel
    import gpu

    test_compile = _module(TESTS / "runtime" / "test_compile.py")

    assert "every_fourth" in test_compile.compiled_configs() and "every_fourth" in context_parallel.strategies()
    assert "every_fourth" in gpu.strategies()
    assert cachekit.get_strategy("every_fourth").knob.field == "offset"  # what `cachekit tune` searches


def _module(path: Path) -> Any:
    """A test module by its path (the test folders are not packages)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_loaded_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loading_every_plugin_imports_no_model_library(tmp_path):
    """`cachekit list` stays quick: adapters name their model classes, imported when first used,
    and metrics import their libraries when they first score."""
    code = (
        "import sys, cachekit\n"
        "from cachekit.registry import registry\n"
        "loaded = registry()\n"
        "assert not loaded.errors, loaded.errors\n"
        "libraries = ('diffusers', 'torchmetrics', 'transformers')\n"
        "print(len(loaded.adapters), sorted(m for m in libraries if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[1:] == ["[]"] and int(result.stdout.split()[0]) >= 19


def test_an_adapter_is_told_by_its_class_names_before_its_class_is_imported():
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    from cachekit.adapter import LazyClass

    flux = cachekit.testing.tiny_flux_transformer()
    lazy = LazyClass("diffusers.WanTransformer3DModel")
    assert not lazy.named_in(flux) and lazy._class is None  # told apart without importing anything
    assert LazyClass("diffusers.FluxTransformer2DModel").named_in(flux)
    assert lazy.__get__(None, None) is WanTransformer3DModel and FluxTransformer2DModel
    assert cachekit.resolve_adapter(flux).name == "flux"
