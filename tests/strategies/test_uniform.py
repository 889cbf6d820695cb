"""Uniform interval reuse against the independent straight-line reference (helpers.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import ExecutionCounter, install_straight_line

import cachekit
from cachekit.schemas import UniformConfig

STEPS = 10


def uniform_computes(step: int, interval: int, warmup: int = 1, steps: int = STEPS) -> bool:
    return step < warmup or step == steps - 1 or step % interval == 0


def uniform(interval):
    return lambda step, branch, probe, embedding: uniform_computes(step, interval)


@pytest.mark.parametrize("interval", [2, 3])
def test_uniform_matches_straight_line_reference_and_runs_only_its_steps(family, interval):
    pipe, run, counted = family
    blocks = counted(pipe.transformer)
    counter = ExecutionCounter(blocks)
    with cachekit.apply(pipe, UniformConfig(interval=interval)) as handle:
        cached = run(pipe, steps=STEPS)
    counter.close()

    expected_schedule = [uniform_computes(step, interval) for step in range(STEPS)]
    computed = sum(expected_schedule)
    # Real block executions: every block, on computed steps only, for both CFG branches.
    assert counter.count == computed * 2 * len(blocks)
    stats = handle.stats.last
    for branch in (0, 1):
        assert stats.branches[branch].span_schedule == expected_schedule
        assert stats.branches[branch].sites["span"].computed == computed
        assert stats.branches[branch].sites["span"].reused == STEPS - computed

    uncached = run(pipe, steps=STEPS)
    install_straight_line(pipe.transformer, uniform(interval))
    reference = run(pipe, steps=STEPS)
    assert torch.equal(cached, reference)
    assert not torch.equal(cached, uncached)  # reuse really changed the result


def test_each_cfg_branch_reuses_its_own_residual(family):
    """Cond and uncond differ (prompt vs negative prompt): re-applying one branch's residual to
    the other gives a different image, so equality with the per-branch reference proves it."""
    pipe, run, _ = family
    with cachekit.apply(pipe, UniformConfig(interval=2)):
        cached = run(pipe, steps=STEPS)
    span = install_straight_line(pipe.transformer, uniform(2), shared_residual=True)
    shared = run(pipe, steps=STEPS)
    span.shared_residual, span.calls = False, 0
    per_branch = run(pipe, steps=STEPS)

    assert torch.equal(cached, per_branch)
    assert not torch.equal(cached, shared)
