"""Step and branch tracking from the timesteps of the model's own calls."""

from __future__ import annotations

import pytest
import torch

from cachekit.errors import StepCountError
from cachekit.steps import StepTracker


def trace(tracker, timesteps):
    out = []
    for timestep in timesteps:
        generation = tracker.generation
        step = tracker.advance(timestep)
        out.append((step.index, step.branch, tracker.generation != generation))
    return out


def test_repeated_timestep_is_a_further_branch():
    assert trace(StepTracker(None), [1.0, 1.0, 0.5, 0.5, 0.2, 0.2]) == [
        (0, 0, True),
        (0, 1, False),
        (1, 0, False),
        (1, 1, False),
        (2, 0, False),
        (2, 1, False),
    ]


def test_one_call_per_step_is_one_branch():
    assert trace(StepTracker(None), [1.0, 0.7, 0.3]) == [(0, 0, True), (1, 0, False), (2, 0, False)]


def test_timestep_going_back_up_starts_a_generation():
    assert trace(StepTracker(None), [1.0, 0.5, 1.0, 0.5]) == [
        (0, 0, True),
        (1, 0, False),
        (0, 0, True),
        (1, 0, False),
    ]


def test_a_call_past_the_known_length_at_a_lower_timestep_is_refused():
    """Either an unwatched pipeline drives the model (its steps would be cut into generations of
    the wrong length) or a generation started lower without a reset: never guessed."""
    tracker = StepTracker(2)
    trace(tracker, [0.9, 0.9, 0.4, 0.4])
    with pytest.raises(StepCountError, match=r"called for step 3 \(timestep 0.2\) of a generation of 2 steps: .*reset"):
        tracker.advance(0.2)
    tracker.start()
    assert tracker.advance(0.2).index == 0  # after a reset, a lower start is a new generation


def test_the_same_timestep_on_another_latent_restarts_the_generation():
    """A loop interrupted after step 0 and started again at the same timestep on new noise is a
    new generation, not a further CFG branch; the same latent again is a branch."""
    first, other = torch.zeros(2), torch.ones(2)
    tracker = StepTracker(None)
    assert trace_samples(tracker, [(1.0, first), (1.0, first.clone()), (1.0, other), (0.5, other)]) == [
        (0, 0, True),
        (0, 1, False),
        (0, 0, True),
        (1, 0, False),
    ]


def trace_samples(tracker, calls):
    out = []
    for timestep, sample in calls:
        generation = tracker.generation
        step = tracker.advance(timestep, sample)
        out.append((step.index, step.branch, tracker.generation != generation))
    return out


def test_start_opens_a_generation_even_at_the_same_timestep():
    tracker = StepTracker(None)
    trace(tracker, [1.0, 0.5])
    tracker.start(num_steps=3)
    step = tracker.advance(0.5)
    assert (step.index, step.branch, step.num_steps, tracker.generation) == (0, 0, 3, 1)
    assert step.is_last is False
    assert tracker.advance(0.3).index == 1
    assert tracker.advance(0.1).is_last
