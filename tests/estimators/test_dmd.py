"""The DMD forecast against cache-dit 1.5.3's `dmd` calibrator (installed without its dependencies,
a test-only reference) on the same sequence of values, and against exact trajectories."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from cache_dit.caching.cache_contexts.calibrators.dmd import DMDState

from cachekit.registry import get_estimator
from cachekit.schemas import DMDConfig
from cachekit.schemas.checked import ConfigError
from cachekit.strategy import Step


def step(index: int) -> Step:
    return Step(index, None, 1000.0 - 20 * index, 0)


def trajectory(steps: int, seed: int, shape: tuple[int, ...] = (2, 3, 16)) -> list[torch.Tensor]:
    """Values that evolve as damped oscillations plus a drift, per batch item, as residuals of a
    denoising loop roughly do."""
    generator = torch.Generator().manual_seed(seed)
    base, swing, drift = (torch.randn(shape, generator=generator) for _ in range(3))
    rate = 0.3 + 0.2 * torch.rand(shape[0], 1, 1, generator=generator)
    return [base + swing * math.exp(-0.05 * t) * torch.cos(rate * t) + 0.02 * t * drift for t in range(steps)]


@pytest.mark.parametrize(
    ("computed", "config"),
    [
        (range(0, 30, 3), {}),  # every third step: the window fills after four
        (range(0, 30, 2), {"window": 5}),
        (range(0, 30, 4), {"rank": 3}),
        ([0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 26, 28], {}),  # the spacing changes: only the even tail is fitted
    ],
)
def test_forecasts_equal_cache_dit_dmd_once_four_evenly_spaced_values_exist(computed, config):
    estimator = get_estimator("dmd")(DMDConfig(**config))
    state = estimator.new_state()
    reference = DMDState(history=config.get("window", 6), rank=config.get("rank", 0))
    values = trajectory(30, seed=len(config))
    compared = 0
    for index, value in enumerate(values):
        reference.mark_step_begin()
        if index in computed:
            estimator.record(state, value, step(index))
            reference.update(value)
            continue
        ours = estimator.estimate(state, step(index))
        theirs = reference.approximate()
        even = [at for at, _ in reference.snapshots]
        if len(even) >= 4 and len({b - a for a, b in itertools.pairwise(even[-4:])}) == 1:  # cache-dit fits here
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            compared += 1
    assert compared >= 4


def test_an_exponential_trajectory_is_forecast_exactly_many_steps_ahead():
    """y_t = a + b 0.9^t + c cos(0.4 t) + d sin(0.4 t) is a sum of four exponentials (1, 0.9 and
    e^{±0.4i}): five pairs of values identify them, so the forecast is exact at any horizon."""
    generator = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(1, 32, generator=generator, dtype=torch.float64) for _ in range(4))
    values = [a + b * 0.9**t + c * math.cos(0.4 * t) + d * math.sin(0.4 * t) for t in range(40)]
    estimator = get_estimator("dmd")(DMDConfig(window=6))
    state = estimator.new_state()
    for t in range(0, 12, 2):
        estimator.record(state, values[t], step(t))
    for ahead in (11, 13, 20, 39):
        torch.testing.assert_close(estimator.estimate(state, step(ahead)), values[ahead], rtol=1e-6, atol=1e-6)


def test_before_four_values_a_straight_line_is_continued_where_cache_dit_overshoots():
    """With fewer values than a fit needs, the last change over its own gap: a straight line stays
    straight. cache-dit's warm-up divides the change over the last two gaps by the last gap only."""
    estimator = get_estimator("dmd")(DMDConfig())
    state = estimator.new_state()
    reference = DMDState()
    for index in range(6):
        reference.mark_step_begin()
        if index in (0, 2, 4):
            estimator.record(state, torch.tensor([float(index)]), step(index))
            reference.update(torch.tensor([float(index)]))
    assert estimator.estimate(state, step(5)).item() == 5.0
    assert reference.approximate().item() == 6.0
    assert estimator.slots() == 6 and len(estimator.kept(state)) == 3


def test_a_degenerate_fit_hands_back_the_last_value():
    estimator = get_estimator("dmd")(DMDConfig())
    state = estimator.new_state()
    constant = torch.ones(2, 4)
    for t in range(0, 8, 2):
        estimator.record(state, constant * 0, step(t))  # all zero: nothing to decompose
    assert torch.equal(estimator.estimate(state, step(7)), constant * 0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"window": 4, "rank": 4}, r"rank 4 needs a window of at least 5 values \(a window of 4 fits at most 3 modes"),
        ({"window": 3}, r"window\n  Input should be greater than or equal to 4"),
    ],
)
def test_bad_dmd_configs_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        DMDConfig(**fields)
