"""Consistent decisions under diffusers' context parallelism: two gloo processes on CPU run the
tiny Flux and Wan with the sequence split over them, with each built-in strategy whose decision
depends on data (and the schedule-only ones), in both orders of `apply` and `enable_parallelism`.
A watchdog fails a test whose processes hang."""

from __future__ import annotations

import pytest
from context_parallel import POLICIES, check_decisions_agree, check_divergence_is_named, spawn


def test_every_rank_decides_as_one_process_would_under_ulysses():
    spawn(check_decisions_agree, 2, "ulysses", ["flux", "wan"], sorted(POLICIES))


@pytest.mark.slow
def test_every_rank_decides_as_one_process_would_under_ring_attention():
    spawn(check_decisions_agree, 2, "ring", ["flux", "wan"], sorted(POLICIES))


def test_a_rank_divergent_plugin_policy_gets_the_named_error_on_every_rank():
    spawn(check_divergence_is_named, 2)
