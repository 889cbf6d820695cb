"""Shared fixtures: tiny real diffusers pipelines and transformers with random weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cachekit
from cachekit import registry as registry_module
from cachekit import testing
from cachekit.hookspecs import hookimpl
from cachekit.registry import Registry


@pytest.fixture
def flux_pipe():
    return testing.tiny_flux_pipeline()


@pytest.fixture
def wan_pipe():
    return testing.tiny_wan_pipeline()


@pytest.fixture(params=["flux", "wan"])
def family(request):
    """A model family: (pipeline builder, one CFG generation, the blocks' attention to count)."""
    if request.param == "flux":
        return testing.tiny_flux_pipeline(), testing.run_flux, _flux_counted
    return testing.tiny_wan_pipeline(), testing.run_wan, _wan_counted


def _flux_counted(transformer) -> list[nn.Module]:
    return [block.attn for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]]


def _wan_counted(transformer) -> list[nn.Module]:
    return [block.attn1 for block in transformer.blocks]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry of its own, so plugins registered by a test do not leak into others."""
    fresh = Registry()
    fresh.load_entry_points()
    monkeypatch.setattr(registry_module, "registry", lambda: fresh)
    return fresh


@pytest.fixture
def register_strategy(fresh_registry):
    """Register a strategy class defined in a test, through the plugin hooks."""

    def register(strategy):
        class Plugin:
            @hookimpl
            def cachekit_register_strategies(self, register):
                register(strategy)

        cachekit.register_plugin(Plugin(), f"test-{strategy.name()}")
        assert not fresh_registry.errors

    return register


def pytest_terminal_summary(terminalreporter):
    """How many cells of the conformance matrix were skipped, and the declared reasons."""
    cells = [
        report
        for outcome in ("passed", "failed", "skipped")
        for report in terminalreporter.stats.get(outcome, [])
        if "test_conformance.py" in report.nodeid and report.when in ("call", "setup")
    ]
    skipped = [report for report in cells if report.skipped]
    if not cells:
        return
    terminalreporter.write_line(f"conformance matrix: {len(cells)} cells, {len(skipped)} skipped")
    reasons: dict[str, int] = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items()):
        terminalreporter.write_line(f"  {count} x {reason}")
