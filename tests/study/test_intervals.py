"""Bootstrap intervals, against what they must equal or approach when worked out by hand."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from cachekit.study.intervals import bootstrap, paired_difference


def test_a_constant_sample_has_no_width_and_infinite_values_are_left_out():
    interval = bootstrap([3.0, 3.0, math.inf, 3.0])
    assert (interval.mean, interval.low, interval.high, interval.samples) == (3.0, 3.0, 3.0, 3)
    assert bootstrap([math.inf]) is None


def test_the_interval_of_a_large_sample_is_the_normal_one_worked_out_by_hand():
    values = list(np.random.default_rng(1).normal(40.0, 2.0, size=400))
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))  # the mean's 95% normal interval
    interval = bootstrap(values)
    assert interval.mean == pytest.approx(statistics.fmean(values))
    assert interval.low == pytest.approx(interval.mean - half, abs=0.03)
    assert interval.high == pytest.approx(interval.mean + half, abs=0.03)


def test_the_bootstrap_of_a_tiny_sample_is_its_resampled_means_percentiles():
    """Two values: each resample's mean is 1, 1.5 or 2 with chances 1/4, 1/2, 1/4, so the 2.5th and
    97.5th percentiles are 1 and 2."""
    interval = bootstrap([1.0, 2.0])
    assert (interval.mean, interval.low, interval.high) == (1.5, 1.0, 2.0)


def test_a_paired_difference_pairs_by_sample_and_a_shared_offset_is_certain():
    first = {(0, "a"): 40.0, (0, "b"): 30.0, (1, "a"): 35.0, (1, "b"): math.inf}
    second = {(0, "a"): 39.0, (0, "b"): 29.0, (1, "a"): 34.0, (1, "b"): 20.0, (2, "a"): 0.0}
    difference = paired_difference(first, second)
    assert (difference.mean, difference.low, difference.high, difference.samples) == (1.0, 1.0, 1.0, 3)
    assert difference.excludes_zero
    noisy = paired_difference({k: 1.0 for k in range(4)}, {0: 2.0, 1: 0.0, 2: 2.0, 3: 0.0})
    assert noisy.mean == 0.0 and not noisy.excludes_zero
