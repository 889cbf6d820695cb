"""Step and branch tracking from the timesteps of the model's own calls."""

from __future__ import annotations

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


def test_known_length_ends_the_generation():
    # The second generation starts lower than the last step: only the known length tells.
    assert trace(StepTracker(2), [0.9, 0.9, 0.4, 0.4, 0.2, 0.2]) == [
        (0, 0, True),
        (0, 1, False),
        (1, 0, False),
        (1, 1, False),
        (0, 0, True),
        (0, 1, False),
    ]


def test_start_opens_a_generation_even_at_the_same_timestep():
    tracker = StepTracker(None)
    trace(tracker, [1.0, 0.5])
    tracker.start(num_steps=3)
    step = tracker.advance(0.5)
    assert (step.index, step.branch, step.num_steps, tracker.generation) == (0, 0, 3, 1)
    assert step.is_last is False
    assert tracker.advance(0.3).index == 1
    assert tracker.advance(0.1).is_last
