"""Bad input gets an error that names what is wrong and what is allowed."""

from __future__ import annotations

from typing import Literal

import pydantic
import pytest
from helpers import flux_inputs
from strategies_for_tests import NeverComputes, NeverComputesAttention
from torch import nn

import cachekit
from cachekit.adapter import Place
from cachekit.adapters.flux import FluxAdapter
from cachekit.errors import (
    AlreadyAttachedError,
    HandleRemovedError,
    MissingPointError,
    StrategyError,
    UnknownStrategyError,
    UnsupportedModelError,
)
from cachekit.schemas import StrategyConfig, UniformConfig
from cachekit.testing import run_flux, tiny_flux_transformer


def test_unknown_strategy_in_a_config_dict(flux_pipe):
    with pytest.raises(UnknownStrategyError, match=r"unknown strategy 'fora'; known strategies: .*uniform"):
        cachekit.apply(flux_pipe, {"strategy": "fora"})


def test_config_dict_without_strategy(flux_pipe):
    with pytest.raises(ValueError, match=r"needs a 'strategy' key; known strategies: .*uniform"):
        cachekit.apply(flux_pipe, {"interval": 2})


@pytest.mark.parametrize(
    ("fields", "field", "allowed"),
    [
        ({"interval": 0}, "interval", "greater than or equal to 1"),
        ({"warmup": 0}, "warmup", "greater than or equal to 1"),
        ({"interval": "often"}, "interval", "valid integer"),
        ({"num_inference_steps": -3}, "num_inference_steps", "greater than or equal to 1"),
        (
            {"intervall": 2},
            "intervall",
            "unknown field \\(did you mean 'interval'\\?\\); UniformConfig takes: strategy",
        ),
    ],
)
def test_out_of_range_fields_name_the_field_and_the_range(flux_pipe, fields, field, allowed):
    with pytest.raises(pydantic.ValidationError, match=rf"(?s){field}\n.*{allowed}"):
        cachekit.apply(flux_pipe, {"strategy": "uniform", **fields})
    with pytest.raises(pydantic.ValidationError, match=rf"(?s){field}\n.*{allowed}"):
        UniformConfig(**fields)


def test_unsupported_model_names_its_class_and_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"supports Linear; supported models: .*FluxTransformer2DModel"):
        cachekit.apply(nn.Linear(2, 2), UniformConfig(num_inference_steps=4))


def test_target_that_is_neither_pipeline_nor_module():
    with pytest.raises(TypeError, match=r"pipeline with a `transformer` or a transformer module, got str"):
        cachekit.apply("flux", UniformConfig())


def test_applying_twice_to_the_same_model(flux_pipe):
    handle = cachekit.apply(flux_pipe, UniformConfig())
    with pytest.raises(AlreadyAttachedError, match=r"FluxTransformer2DModel already has a cache strategy attached"):
        cachekit.apply(flux_pipe.transformer, UniformConfig(num_inference_steps=4))
    handle.remove()
    cachekit.apply(flux_pipe, UniformConfig()).remove()  # allowed again once removed


def test_using_a_removed_handle(flux_pipe):
    handle = cachekit.apply(flux_pipe, UniformConfig())
    run_flux(flux_pipe, steps=4)
    handle.remove()
    for use in (handle.remove, handle.reset, handle.__enter__):
        with pytest.raises(HandleRemovedError, match="this CacheHandle was removed"):
            use()
    assert handle.stats.last.branches[0].calls == 4  # what ran stays readable


def test_bare_transformer_needs_the_generation_length_for_uniform():
    with pytest.raises(ValueError, match=r"'uniform' must know the generation's length: .*num_inference_steps"):
        cachekit.apply(tiny_flux_transformer(), UniformConfig())


def test_config_of_the_wrong_class_for_its_strategy(flux_pipe):
    class Impostor(StrategyConfig):
        strategy: Literal["uniform"] = "uniform"

    with pytest.raises(TypeError, match="strategy 'uniform' takes a UniformConfig, got Impostor"):
        cachekit.apply(flux_pipe, Impostor())


def test_missing_point_fails_at_attach_naming_point_and_model(monkeypatch, flux_pipe):
    monkeypatch.setattr(FluxAdapter, "missing", {Place.SPAN: "its blocks are fused"})
    with pytest.raises(
        MissingPointError, match=r"'uniform' needs the 'span' point, .*FluxTransformer2DModel: its blocks"
    ):
        cachekit.apply(flux_pipe, UniformConfig())
    assert "_diffusers_hook" not in vars(flux_pipe.transformer.transformer_blocks[0])


def test_strategy_that_reuses_before_computing_is_stopped(register_strategy):
    register_strategy(NeverComputes)
    model = tiny_flux_transformer()
    with (
        cachekit.apply(model, {"strategy": "never_computes"}),
        pytest.raises(
            StrategyError, match=r"'never_computes' chose to reuse the span at step 0 \(branch 0\) before computing"
        ),
    ):
        model(**flux_inputs())


def test_strategy_that_reuses_attention_before_computing_is_stopped(register_strategy):
    register_strategy(NeverComputesAttention)
    model = tiny_flux_transformer()
    with (
        cachekit.apply(model, {"strategy": "never_computes_attention"}),
        pytest.raises(StrategyError, match=r"reuse transformer_blocks.0.attn at step 0 \(branch 0\) before computing"),
    ):
        model(**flux_inputs())
