"""Estimators: how a skipped value is produced, checked against independent references."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
from diffusers.hooks.taylorseer_cache import TaylorSeerState
from helpers import flux_inputs

import cachekit
from cachekit.errors import UnknownEstimatorError
from cachekit.estimator import Kept
from cachekit.hookspecs import hookimpl
from cachekit.registry import PluginWarning, get_estimator
from cachekit.schemas import CopyConfig, FoCaConfig, TaylorConfig, TeaCacheConfig, UniformConfig
from cachekit.strategy import Step
from cachekit.testbed import load
from cachekit.testing import tiny_flux_transformer


def step(index: int, timestep: float | None = None) -> Step:
    return Step(index, None, 1000.0 - 20 * index if timestep is None else timestep, 0)


def make(config):
    return get_estimator(config.kind)(config)


def test_copy_hands_back_the_last_computed_value_itself():
    estimator = make(CopyConfig())
    state = estimator.new_state()
    first, second = torch.randn(3), torch.randn(3)
    estimator.record(state, first, step(0))
    estimator.record(state, second, step(1))
    assert estimator.estimate(state, step(5)) is second
    assert estimator.kept(state) == [second]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylor_over_steps_equals_diffusers_taylorseer(order):
    """diffusers' TaylorSeerState (float32 factors) is the reference: same recursion, same forecast."""
    estimator = make(TaylorConfig(order=order, spacing="step"))
    state = estimator.new_state()
    reference = TaylorSeerState(taylor_factors_dtype=torch.float32, max_order=order)
    generator = torch.Generator().manual_seed(order)
    for computed in [0, 1, 2, 4, 7, 9]:
        value = torch.randn(4, 5, generator=generator)
        estimator.record(state, value, step(computed))
        reference.current_step = computed
        reference.update((value,))
        for ahead in (1, 2, 3):
            reference.current_step = computed + ahead
            torch.testing.assert_close(
                estimator.estimate(state, step(computed + ahead)), reference.predict()[0], rtol=0, atol=0
            )


def test_taylor_over_timesteps_is_exact_for_a_value_linear_in_the_timestep():
    """Spaced by the real timestep distance, a first-order forecast of a value that changes
    linearly with the timestep is exact on a non-uniform schedule (step counts would miss it)."""
    timesteps = [1000.0, 960.0, 850.0, 600.0, 450.0]
    slope, offset = torch.randn(6) / 1000, torch.randn(6)  # values of order 1 over timesteps of order 1000
    by_timestep = make(TaylorConfig(order=1))
    by_step = make(TaylorConfig(order=1, spacing="step"))
    states = [by_timestep.new_state(), by_step.new_state()]
    for index in (0, 1):
        for estimator, state in zip((by_timestep, by_step), states, strict=True):
            estimator.record(state, offset + slope * timesteps[index], step(index, timesteps[index]))
    for index in (2, 3, 4):
        truth = offset + slope * timesteps[index]
        torch.testing.assert_close(by_timestep.estimate(states[0], step(index, timesteps[index])), truth)
        assert not torch.allclose(by_step.estimate(states[1], step(index, timesteps[index])), truth)


def test_taylor_keeps_order_plus_one_tensors_and_uses_the_orders_it_has():
    estimator = make(TaylorConfig(order=2))
    state = estimator.new_state()
    value = torch.ones(2)
    estimator.record(state, value, step(0))
    assert estimator.estimate(state, step(1)) is value  # one value: a copy
    for index in (1, 2, 3):
        estimator.record(state, value * (index + 1), step(index))
    assert len(estimator.kept(state)) == 3


def foca_reference(computed: list[tuple[int, torch.Tensor]], skipped: list[int]) -> list[torch.Tensor]:
    """FoCa's forecast written out from its definition, for one run of skipped steps after the
    computed ones: BDF2 predictor, Heun corrector, damped beyond three steps."""
    full = [value for _, value in computed]
    handed = list(full)
    last_step = computed[-1][0]
    out = []
    for index in skipped:
        gap = index - last_step
        if len(full) < 2:
            forecast = full[-1]
        else:
            d_full, d_local = full[-1] - full[-2], handed[-1] - handed[-2]
            if gap <= 3:
                forecast = full[-1] + gap / 2 * (d_full + d_local)
            else:
                forecast = 3 / gap * (full[-1] + 1.5 * (d_full + d_local)) + (1 - 3 / gap) * full[-1]
        handed.append(forecast)
        out.append(forecast)
    return out


def test_foca_follows_its_definition():
    estimator = make(FoCaConfig())
    state = estimator.new_state()
    generator = torch.Generator().manual_seed(0)
    computed = [(0, torch.randn(8, generator=generator)), (2, torch.randn(8, generator=generator))]
    for index, value in computed:
        estimator.record(state, value, step(index))
    skipped = [3, 4, 5, 6, 7]
    for index, expected in zip(skipped, foca_reference(computed, skipped), strict=True):
        torch.testing.assert_close(estimator.estimate(state, step(index)), expected)
    lone = estimator.new_state()
    estimator.record(lone, computed[0][1], step(0))
    assert torch.equal(estimator.estimate(lone, step(1)), computed[0][1])  # one computed value: a copy


def test_kept_rebuilds_tuples_with_nones_and_counts_bytes():
    kept = Kept(make(TaylorConfig(order=1)))
    a, b = torch.zeros(2, 3), torch.zeros(4)
    kept.record((a, None, (b,)), step(0))
    kept.record((a + 1, None, (b + 2,)), step(1))
    estimate = kept.estimate(step(2, 1000.0 - 40))
    assert estimate[1] is None and isinstance(estimate[2], tuple)
    torch.testing.assert_close(estimate[0], a + 2)
    torch.testing.assert_close(estimate[2][0], b + 4)
    assert kept.nbytes == 2 * (a.numel() + b.numel()) * 4  # F0 and F1 of each tensor, float32


@pytest.mark.parametrize(("config", "tensors_per_residual"), [(CopyConfig(), 1), (TaylorConfig(order=3), 4)])
def test_stats_report_the_bytes_the_estimator_keeps(config, tensors_per_residual):
    """Per branch, the span's residual of each stream (image and text tokens), times what the
    estimator keeps of it: one for a copy, order + 1 for a Taylor forecast."""
    model = tiny_flux_transformer()
    with cachekit.apply(model, UniformConfig(interval=2, num_inference_steps=8, estimator=config)) as handle:
        for index in range(8):
            model(**flux_inputs(timestep=1 - index / 8))
    inputs = flux_inputs()
    tokens = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    residual_bytes = tokens * model.inner_dim * 4  # both streams, at the blocks' width, float32
    branch = handle.stats.last.branches[0]
    assert branch.kept_bytes == branch.peak_kept_bytes == residual_bytes * tensors_per_residual


def test_taylor_forecast_beats_the_copy_on_the_trained_testbed():
    """What the estimator is for: at the same schedule, the forecast lands nearer the uncached sample
    (at the testbed's 50 steps; over 20 steps of three the forecast overshoots and the copy wins)."""
    pipe = load("flux-digits")
    reference = pipe([5], seed=3)
    errors = {}
    for name, estimator in [("copy", CopyConfig()), ("taylor", TaylorConfig(order=2))]:
        with cachekit.apply(pipe, UniformConfig(interval=3, estimator=estimator)):
            errors[name] = (pipe([5], seed=3) - reference).pow(2).mean().item()
    assert errors["taylor"] < errors["copy"] / 5, errors


def test_any_strategy_takes_an_estimator_by_name_or_dict():
    config = cachekit.make_config(
        {"strategy": "teacache", "rel_l1_thresh": 0.1, "coefficients": [1, 0], "estimator": "foca"}
    )
    assert config.estimator == FoCaConfig()
    assert TeaCacheConfig(
        rel_l1_thresh=0.1, coefficients=(1, 0), estimator={"kind": "taylor", "order": 2}
    ).estimator == (TaylorConfig(order=2))


@pytest.mark.parametrize(
    ("estimator", "error", "message"),
    [
        (
            {"kind": "taylr"},
            UnknownEstimatorError,
            r"unknown estimator kind 'taylr'; known kinds: copy, .*foca, meancache, taylor",
        ),
        ({"kind": "taylor", "order": 0}, pydantic.ValidationError, r"estimator\.order\n.*greater than or equal to 1"),
        ({"kind": "taylor", "order": 9}, pydantic.ValidationError, r"estimator\.order\n.*less than or equal to 4"),
        (
            {"kind": "taylor", "spacing": "seconds"},
            pydantic.ValidationError,
            r"estimator\.taylor\.spacing|'timestep' or 'step'",
        ),
        ({"order": 2}, pydantic.ValidationError, r"an estimator needs a 'kind'; built-in kinds: copy, taylor, foca"),
        (
            {"kind": "copy", "order": 2},
            pydantic.ValidationError,
            r"estimator\.order\n  unknown field; CopyConfig takes: kind, dtype$",
        ),
    ],
)
def test_bad_estimator_configs_are_named(estimator, error, message):
    with pytest.raises(error, match=message):
        cachekit.make_config({"strategy": "uniform", "estimator": estimator})


def test_a_plugin_estimator_registers_through_the_hooks_and_is_validated(fresh_registry):
    from typing import Literal

    from cachekit.schemas import EstimatorConfig

    class HalfConfig(EstimatorConfig):
        kind: Literal["half"] = "half"
        scale: float = pydantic.Field(default=0.5, gt=0)

    class Half(cachekit.Estimator[HalfConfig]):
        """The last computed value times `scale`: wrong on purpose, so its effect is visible."""

        config_class = HalfConfig

        def new_state(self):
            return {}

        def record(self, state, value, step):
            state["last"] = value

        def estimate(self, state, step):
            return state["last"] * self.config.scale

        def kept(self, state):
            return [state["last"]]

    class Plugin:
        @hookimpl
        def cachekit_register_estimators(self, register):
            register(Half)

    class Broken:
        @hookimpl
        def cachekit_register_estimators(self, register):
            register(int)

    cachekit.register_plugin(Plugin(), "half-plugin")
    with pytest.warns(PluginWarning, match="'broken-estimator' failed to load: .*not an Estimator subclass"):
        cachekit.register_plugin(Broken(), "broken-estimator")
    assert "half" in cachekit.list_estimators()
    config = cachekit.make_config({"strategy": "uniform", "estimator": {"kind": "half", "scale": 0.25}})
    assert isinstance(config.estimator, HalfConfig) and config.estimator.scale == 0.25
    with pytest.raises(pydantic.ValidationError, match=r"scale\n.*greater than 0"):
        cachekit.make_config({"strategy": "uniform", "estimator": {"kind": "half", "scale": 0}})

    model = tiny_flux_transformer()
    with cachekit.apply(model, {"strategy": "uniform", "interval": 2, "num_inference_steps": 3, "estimator": "half"}):
        model(**flux_inputs(timestep=1.0))
        computed = model(**flux_inputs(timestep=0.6))[0]
    with cachekit.apply(model, {"strategy": "uniform", "interval": 2, "num_inference_steps": 3}):
        model(**flux_inputs(timestep=1.0))
        copied = model(**flux_inputs(timestep=0.6))[0]
    assert not torch.allclose(computed, copied) and math.isfinite(computed.abs().sum().item())
