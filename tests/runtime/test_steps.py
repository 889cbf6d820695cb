"""Step and branch tracking: from the pipeline (cache context, watched scheduler), else from the
timesteps of the model's own calls."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks.hooks import CacheContext

from cachekit.errors import StepCountError
from cachekit.steps import StepTracker, watch_scheduler


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


class Scheduler:
    """The parts of a diffusers scheduler the tracker watches."""

    def __init__(self, timesteps, begin_index=None):
        self.schedule = torch.tensor(timesteps)
        self.begin_index = begin_index

    def set_timesteps(self, num_inference_steps=None):
        self.timesteps = self.schedule

    def step(self, *args):
        return args


class Reads:
    """A call's timestep that counts how often it is read from the 'device'."""

    def __init__(self):
        self.count = 0

    def __call__(self, value):
        def read():
            self.count += 1
            return value

        return read


def watched(timesteps, **scheduler):
    tracker, schedule = StepTracker(None), Scheduler(timesteps, **scheduler)
    watch_scheduler(schedule, tracker)
    return tracker, schedule


def test_the_watched_scheduler_gives_steps_branches_and_exact_timesteps_without_reading_the_calls():
    """bf16 rounds 999.0 and 998.0 to one value: still two steps, with the schedule's values; once
    a step came through scheduler.step, nothing is read from the calls."""
    tracker, scheduler = watched([999.0, 998.0, 600.0])
    reads = Reads()
    seen = []
    for generation in range(2):
        scheduler.set_timesteps()
        for bf16_value in (998.0, 998.0, 600.0):
            for _ in range(2):  # cond, uncond
                step = tracker.advance(reads(bf16_value))
                seen.append((tracker.generation, step.index, step.branch, step.timestep, step.num_steps))
            scheduler.step()
        if generation == 0:
            assert reads.count == 1  # the first call's, to see that the model's timesteps are the schedule's
    assert seen[:6] == [
        (0, 0, 0, 999.0, 3),
        (0, 0, 1, 999.0, 3),
        (0, 1, 0, 998.0, 3),
        (0, 1, 1, 998.0, 3),
        (0, 2, 0, 600.0, 3),
        (0, 2, 1, 600.0, 3),
    ]
    assert [entry[0] for entry in seen[6:]] == [1] * 6 and seen[6:] == [(1, *entry[1:]) for entry in seen[:6]]
    assert reads.count == 1 and tracker.source == "scheduler" and tracker.note is None


def test_a_schedule_that_starts_later_counts_its_steps_from_there():
    """img2img pipelines set the scheduler's begin_index: fewer steps, the later timesteps."""
    tracker, scheduler = watched([900.0, 700.0, 500.0, 300.0], begin_index=2)
    scheduler.set_timesteps()
    first = tracker.advance(500.0)
    scheduler.step()
    last = tracker.advance(300.0)
    assert (first.index, first.timestep, first.num_steps) == (0, 500.0, 2) and last.is_last and last.timestep == 300.0


def test_a_loop_that_never_steps_the_watched_scheduler_is_refused():
    """Its calls would all be branches of step 0 (each computed: nothing is reused from another
    branch), until there are more than any pipeline makes."""
    tracker, scheduler = watched([900.0, 500.0, 100.0])
    scheduler.set_timesteps()
    steps = [tracker.advance(value) for value in (900.0, 900.0, 500.0, 500.0, 100.0, 100.0, 50.0, 50.0)]
    assert [(s.index, s.branch) for s in steps] == [(0, branch) for branch in range(8)]
    with pytest.raises(StepCountError, match=r"called 9 times in step 0 without the pipeline's scheduler stepping"):
        tracker.advance(20.0)


def test_an_adapter_that_knows_its_timesteps_are_the_schedule_s_reads_none():
    from cachekit.adapters.flux import FluxAdapter
    from cachekit.testing import tiny_flux_transformer

    tracker, scheduler = StepTracker(None), Scheduler([900.0, 500.0])
    watch_scheduler(scheduler, tracker, FluxAdapter(tiny_flux_transformer()))
    reads = Reads()
    scheduler.set_timesteps()
    first = tracker.advance(reads(898.0))
    scheduler.step()
    second = tracker.advance(reads(498.0))
    assert (first.timestep, second.timestep, reads.count) == (900.0, 500.0, 0)


def test_timesteps_on_another_scale_than_the_schedule_are_read_from_the_calls():
    """Cosmos passes sigma / (sigma + 1), not the scheduler's timestep: steps still come from the
    scheduler, the values from each call."""
    tracker, scheduler = watched([80.0, 1.0])
    scheduler.set_timesteps()
    first = tracker.advance(0.98)
    scheduler.step()
    second = tracker.advance(0.5)
    assert (first.index, first.timestep, second.index, second.timestep) == (0, 0.98, 1, 0.5)
    assert "not on its scheduler's scale" in tracker.note


def test_a_generation_the_watched_scheduler_did_not_start_is_told_from_its_timesteps():
    """The pipeline's call is over (diffusers resets stateful hooks); another loop drives the
    transformer: its steps are not branches of one step."""
    tracker, scheduler = watched([900.0, 500.0])
    scheduler.set_timesteps()
    tracker.advance(900.0)
    scheduler.step()
    tracker.advance(500.0)
    tracker.start()  # the pipeline call ended
    steps = [tracker.advance(value) for value in (800.0, 400.0)]
    assert [(s.index, s.branch) for s in steps] == [(0, 0), (1, 0)] and tracker.generation == 1


def test_a_cache_context_with_a_step_index_gives_the_steps():
    tracker = StepTracker(None)
    contexts = [CacheContext("cond", step_index=i, num_inference_steps=2, timestep=t) for i, t in ((0, 7.0), (1, 7.0))]
    steps = [tracker.advance(Reads()(7.0), context=context) for context in (contexts[0], contexts[0], contexts[1])]
    assert [(s.index, s.branch, s.num_steps, s.timestep) for s in steps] == [
        (0, 0, 2, 7.0),
        (0, 1, 2, 7.0),
        (1, 0, 2, 7.0),
    ]
    again = tracker.advance(7.0, context=contexts[0])
    assert (again.index, tracker.generation) == (0, 1)


def stepped_by_contexts(pipe):
    """Hands each transformer call the step the scheduler's own counter is at, as a cache context
    with a step index: another source of the steps, through another path, for reference."""
    from diffusers.hooks.hooks import _set_cache_context

    def give_step(module, args, kwargs):
        _set_cache_context(module, CacheContext("call", step_index=pipe.scheduler.step_index or 0))

    return pipe.transformer.register_forward_pre_hook(give_step, with_kwargs=True)


def bf16_testbed():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cachekit import testbed

    pipe = testbed.load("flux-digits").to(dtype=torch.bfloat16)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=12.0)
    return pipe, lambda: pipe([3], num_inference_steps=STEPS_THAT_COLLIDE)


def bf16_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cachekit.testing import run_flux, tiny_flux_pipeline

    pipe = tiny_flux_pipeline().to(torch.bfloat16)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=12.0)
    return pipe, lambda: run_flux(pipe, steps=STEPS_THAT_COLLIDE)


STEPS_THAT_COLLIDE = 50  # at shift 12, 6 pairs of consecutive steps share a bf16 timestep


@pytest.mark.parametrize("make", [bf16_testbed, bf16_flux], ids=["testbed", "flux"])
def test_bf16_timesteps_that_collide_are_one_generation_of_the_scheduled_steps(make):
    import cachekit
    from cachekit.schemas import UniformConfig

    pipe, run = make()
    pipe.scheduler.set_timesteps(STEPS_THAT_COLLIDE)
    rounded = (pipe.scheduler.timesteps / 1000).to(torch.bfloat16)
    assert int((rounded[1:] == rounded[:-1]).sum()) >= 5  # the schedule does collide in bf16
    outputs, handles = [], []
    for reference in (False, True):
        with cachekit.apply(pipe, UniformConfig(interval=2)) as handle:
            context = stepped_by_contexts(pipe) if reference else None
            outputs.append(run())
            if context is not None:
                context.remove()
        handles.append(handle)
    assert handles[0]._runtime.tracker.source == "scheduler" and handles[1]._runtime.tracker.source == "context"
    expected = [index % 2 == 0 or index == STEPS_THAT_COLLIDE - 1 for index in range(STEPS_THAT_COLLIDE)]
    for handle in handles:
        assert len(handle.stats.generations) == 1 and handle.stats.last.num_steps == STEPS_THAT_COLLIDE
        for branch in handle.stats.last.branches.values():
            assert branch.calls == STEPS_THAT_COLLIDE and branch.span_schedule == expected  # the last step forced
    assert torch.equal(outputs[0], outputs[1])
