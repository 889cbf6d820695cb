"""Which generation, step and CFG branch each transformer call belongs to.

Steps come from the pipeline, not from timestep values: bf16 pipelines round the timestep they
pass (`t.expand(B).to(latents.dtype)`) until consecutive steps carry the same value. In order of
trust:

1. diffusers' cache context, where the pipeline enters one with a `step_index`;
2. the watched scheduler: `set_timesteps` starts a generation (its timesteps, read once in
   float32, are the steps' timesteps), `step` ends a step, and further transformer calls within
   a step are further branches. A generation the scheduler did not start (another loop driving
   the transformer after the pipeline's call ended) is told from its timesteps, as in (3); a loop
   that calls the transformer over and over without stepping the scheduler is refused. Whether
   the model's timesteps are on its scheduler's scale the adapter says (Cosmos' are not: they
   are read from every call), or the first call's is read once to see;
3. the calls' own timesteps (a bare transformer), compared in float32: a lower value is the next
   step, the same value on the same latent a further branch, a higher value a new generation. The
   same value on another latent is the next step where the step count leaves room (a bf16
   collision, with a warning), else a new generation (a loop restarted at the same timestep).

The experts of a two-transformer pipeline share one tracker, so their steps count through one
generation. Only (3) reads values from the device at every call.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from cachekit.errors import StepCountError
from cachekit.strategy import Step

#: How far a call's timestep may sit from the schedule's and still be on its scale (bf16 keeps 8 bits).
SCALE_TOLERANCE = 1e-2

#: More calls than this in one step of a watched scheduler: it is not the scheduler stepping the loop.
MOST_BRANCHES = 8

#: A call's timestep, or a function that reads it from the device.
Timestep = float | Callable[[], float]


class StepTracker:
    def __init__(self, num_steps: int | None) -> None:
        self.num_steps = num_steps
        self.generation = -1  # how many generations started, minus one
        self.source = "timesteps"  # where steps come from: "context", "scheduler" or "timesteps"
        self.note: str | None = None  # why steps or timesteps come from less than the pipeline offered
        self._open = True  # the next call opens a generation
        self._index = -1
        self._branch = -1
        self._timestep: float | None = None  # the latest call's
        self._sample: torch.Tensor | None = None  # the latent of this step's first call (timestep mode)
        self._warned = False  # of a repeated timestep, in this generation
        self._scheduler: Any = None  # the watched scheduler
        self._schedule: list[float] | None = None  # its timesteps
        self._sigmas: list[float] | None = None  # its noise levels, one more than its timesteps
        self._begin = 0  # where this generation starts in them (img2img starts later)
        self._stepped = 0  # its `step` calls in this generation
        self._scheduled = False  # the watched scheduler started this generation
        self._scale_checked = False
        self._same_scale = True  # the calls' timesteps are the schedule's

    def snapshot(self) -> dict[str, Any]:
        """Where the tracker stands, for `restore` after a call that raised."""
        return dict(vars(self))

    def restore(self, snapshot: dict[str, Any]) -> None:
        vars(self).update(snapshot)

    @property
    def timestep(self) -> float | None:
        """The timestep of the latest call (None before the first)."""
        return self._timestep

    def start(
        self, num_steps: int | None = None, schedule: list[float] | None = None, sigmas: list[float] | None = None
    ) -> None:
        """The next call opens a new generation (of `num_steps` steps, on `schedule` and its noise
        levels `sigmas`, when given)."""
        if num_steps is not None:
            self.num_steps = num_steps
        if schedule is not None and self.source != "timesteps":
            self._schedule, self._sigmas = schedule, sigmas
        self._scheduled = schedule is not None
        self._open = True
        self._stepped = 0

    def watch(self, scheduler: Any, same_scale: bool | None = None) -> None:
        """From now on steps come from `scheduler` (see `watch_scheduler`). `same_scale`: whether
        the model's timesteps are the scheduler's (the adapter knows); None: checked once, on the
        first call."""
        self._scheduler, self.source = scheduler, "scheduler"
        if same_scale is not None:
            self._scale_checked, self._same_scale = True, same_scale

    def stepped(self) -> None:
        """The watched scheduler finished a step."""
        self._stepped += 1

    def opens_generation(self, timestep: Timestep, sample: torch.Tensor | None = None, context: Any = None) -> bool:
        """Whether a call would open a new generation (changes nothing)."""
        index = getattr(context, "step_index", None)
        if index is not None:
            return self._open or index < self._index
        if self._watching():
            return self._open
        return self._from_timesteps(_reader(timestep)(), sample)[2]

    def advance(self, timestep: Timestep, sample: torch.Tensor | None = None, context: Any = None) -> Step:
        """The step of a call: `timestep` is its timestep (or a function reading it, called only
        where needed), `sample` its latent, `context` diffusers' cache context if the pipeline
        entered one. `generation` counts up when the call opens one."""
        read = _reader(timestep)
        seen: float | None = None
        collided = False
        watching = False
        if getattr(context, "step_index", None) is not None:
            self.source = "context"
            index = context.step_index
            opens = self._open or index < self._index
            branch = 0 if opens or index != self._index else self._branch + 1
            if opens and self._on_schedule() and not self._scale_checked:
                seen = read()
                self._check_scale(seen, self._schedule[self._begin_index()])  # type: ignore[index]
        elif self._watching():
            index, branch, opens, seen = self._from_scheduler(read)
            watching = self.source == "scheduler"
        else:
            seen = read()
            index, branch, opens, collided = self._from_timesteps(seen, sample)
        if opens:
            self._open_generation()
        if collided:
            self._warn_collision(index, seen)
        if getattr(context, "num_inference_steps", None):
            self.num_steps = context.num_inference_steps
        if watching and self.num_steps is not None and index >= self.num_steps:
            raise StepCountError(
                f"the transformer was called for step {index + 1} of a generation of {self.num_steps} steps the "
                "pipeline's scheduler set"
            )
        value = self._timestep_of(index, seen, read, context)
        if opens or index != self._index:
            self._sample = sample
        self._index, self._branch, self._timestep = index, branch, value
        sigma, next_sigma = self._noise_levels(index)
        return Step(index, self.num_steps, value, branch, sigma=sigma, next_sigma=next_sigma)

    def _noise_levels(self, index: int) -> tuple[float | None, float | None]:
        """The step's noise level and the next one's, where the watched scheduler set them."""
        sigmas, at = self._sigmas, self._begin + index
        if not self._on_schedule() or sigmas is None or at + 1 >= len(sigmas):
            return None, None
        return sigmas[at], sigmas[at + 1]

    # -- the sources ----------------------------------------------------------------------------

    def _watching(self) -> bool:
        """Whether the watched scheduler gives this generation's steps: it set them (a generation
        opened otherwise, by another pipeline's loop on this transformer say, is told from its
        timesteps)."""
        return self.source == "scheduler" and self._scheduled

    def _on_schedule(self) -> bool:
        """Whether the watched scheduler set this generation's timesteps."""
        return self._scheduled and self._schedule is not None

    def _begin_index(self) -> int:
        """Where the generation starts in the schedule (img2img pipelines start later)."""
        begin = getattr(self._scheduler, "begin_index", None)
        return begin if isinstance(begin, int) else 0

    def _open_generation(self) -> None:
        self.generation += 1
        self._open, self._warned = False, False
        if self._on_schedule() and self.source != "timesteps":
            self._begin = self._begin_index()
            self.num_steps = len(self._schedule) - self._begin  # type: ignore[arg-type]

    def _from_scheduler(self, read: Callable[[], float]) -> tuple[int, int, bool, float | None]:
        if self._open:
            seen = None
            if not self._scale_checked:
                seen = read()
                self._check_scale(seen, self._schedule[self._begin_index()])  # type: ignore[index]
            return 0, 0, True, seen
        index = self._stepped
        branch = self._branch + 1 if index == self._index else 0
        if branch >= MOST_BRANCHES:
            raise StepCountError(
                f"the transformer was called {branch + 1} times in step {index} without the pipeline's scheduler "
                "stepping: a loop that does not step the scheduler of the pipeline the strategy was applied to drives "
                "it. Apply the strategy to the transformer itself (steps then come from its timesteps), or run it "
                "through that pipeline"
            )
        return index, branch, False, None

    def _check_scale(self, value: float, scheduled: float) -> None:
        self._scale_checked = True
        self._same_scale = abs(value - scheduled) <= SCALE_TOLERANCE * max(abs(scheduled), 1.0)
        if not self._same_scale:
            self.note = (
                f"the model's timesteps are not on its scheduler's scale (first call {value:g}, scheduled "
                f"{scheduled:g}): steps come from the scheduler, timesteps from every call"
            )

    def _from_timesteps(self, timestep: float, sample: torch.Tensor | None) -> tuple[int, int, bool, bool]:
        """(step, branch, opens a generation, collides with the previous step's timestep)."""
        last = self._timestep
        if self._open or last is None or timestep > last:
            return 0, 0, True, False
        if timestep < last:
            if self.num_steps is not None and self._index + 1 >= self.num_steps:
                raise StepCountError(
                    f"the transformer was called for step {self._index + 2} (timestep {timestep:g}) of a generation "
                    f"of {self.num_steps} steps: a pipeline whose scheduler cachekit does not watch drives it (a "
                    "transformer shared by two pipelines? apply the strategy to the pipeline that runs it), the loop "
                    "runs more steps than num_inference_steps says, or a new generation started lower than the "
                    "last one ended (call handle.reset() between generations)"
                )
            return self._index + 1, 0, False, False
        if _same(sample, self._sample):
            return self._index, self._branch + 1, False, False
        if self.num_steps is not None and self._index + 1 < self.num_steps:
            return self._index + 1, 0, False, True
        return 0, 0, True, False  # a loop restarted at the same timestep on new noise

    def _warn_collision(self, index: int, timestep: float | None) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"steps {index - 1} and {index} were called at the same timestep ({timestep:g}), as bf16 timesteps "
            "round: cachekit counts them as consecutive steps of one generation. Apply the strategy to the pipeline "
            "(its scheduler gives the steps) to make that certain",
            UserWarning,
            stacklevel=5,
        )

    def _timestep_of(self, index: int, seen: float | None, read: Callable[[], float], context: Any) -> float:
        """The call's timestep: what the pipeline gave, where it gave it, so nothing is read."""
        given = getattr(context, "timestep", None)
        if isinstance(given, int | float):
            return float(given)
        schedule = self._schedule
        if self.source != "timesteps" and self._scheduled and schedule is not None and self._same_scale:
            position = self._begin + index
            if position < len(schedule):
                return schedule[position]
        return seen if seen is not None else read()


def _reader(timestep: Timestep) -> Callable[[], float]:
    return timestep if callable(timestep) else lambda: timestep


def _same(sample: torch.Tensor | None, other: torch.Tensor | None) -> bool:
    """Whether two calls were made on the same latent (unknown counts as the same)."""
    if sample is None or other is None or sample is other:
        return True
    return sample.shape == other.shape and bool(torch.equal(sample, other))


def watch_scheduler(scheduler: Any, tracker: StepTracker, adapter: Any = None) -> Callable[[], None]:
    """Let `scheduler` give `tracker` its steps: each `set_timesteps` starts a generation on its
    timesteps (on the model's scale, as `adapter` maps them), each `step` ends a step. Returns the
    undo."""
    relation = getattr(adapter, "schedule_timesteps", None)
    to_model = adapter.scheduled if adapter is not None else float
    same_scale = None if relation is None else relation != "call"
    own = {name: scheduler.__dict__.get(name) for name in ("set_timesteps", "step")}
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    @functools.wraps(set_timesteps)  # pipelines inspect its signature
    def watched_set_timesteps(*args: Any, **kwargs: Any) -> Any:
        result = set_timesteps(*args, **kwargs)
        timesteps = torch.as_tensor(scheduler.timesteps)  # read once, before the transformer runs
        sigmas = getattr(scheduler, "sigmas", None)
        levels = None
        if isinstance(sigmas, torch.Tensor) and len(sigmas) == len(timesteps) + 1:  # a flow-matching schedule
            levels = sigmas.float().tolist()
        tracker.start(len(timesteps), [to_model(value) for value in timesteps.float().tolist()], levels)
        return result

    @functools.wraps(step)
    def watched_step(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        tracker.stepped()
        return result

    scheduler.set_timesteps, scheduler.step = watched_set_timesteps, watched_step
    tracker.watch(scheduler, same_scale)

    def unwatch() -> None:
        for name, method in own.items():
            if method is None:
                delattr(scheduler, name)
            else:
                setattr(scheduler, name, method)

    return unwatch
