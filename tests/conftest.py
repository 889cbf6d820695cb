"""Shared fixtures: tiny real diffusers pipelines and transformers with random weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cachekit import testing


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
