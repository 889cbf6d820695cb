"""Step and branch tracking from the model's own calls.

A new timestep value starts a new step; further calls at the same timestep are further CFG
branches. A generation starts at the first call, after `start()` (the pipeline's scheduler set
new timesteps, or the user reset), when the timestep goes back up (denoising never does), or
when a known number of steps has been run. The experts of a two-transformer pipeline share one
tracker, so their steps count through one generation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from cachekit.policy import Step


class StepTracker:
    def __init__(self, num_steps: int | None) -> None:
        self.num_steps = num_steps
        self._timestep: float | None = None
        self._index = -1
        self._branch = -1
        self.generation = -1  # how many generations started, minus one

    @property
    def timestep(self) -> float | None:
        """The timestep of the latest call (None before the first of a generation)."""
        return self._timestep

    def start(self, num_steps: int | None = None) -> None:
        """The next call opens a new generation (of `num_steps` steps, when given)."""
        if num_steps is not None:
            self.num_steps = num_steps
        self._timestep = None

    def advance(self, timestep: float) -> Step:
        """The step of a call at `timestep`; `generation` counts up when it opens a new one."""
        new_generation = (
            self._timestep is None
            or timestep > self._timestep
            or (timestep != self._timestep and self.num_steps is not None and self._index + 1 >= self.num_steps)
        )
        if new_generation:
            self._index, self._branch = 0, 0
            self.generation += 1
        elif timestep == self._timestep:
            self._branch += 1
        else:
            self._index, self._branch = self._index + 1, 0
        self._timestep = timestep
        return Step(self._index, self.num_steps, timestep, self._branch)


def watch_scheduler(scheduler: Any, tracker: StepTracker) -> Callable[[], None]:
    """A pipeline sets its scheduler's timesteps once per generation: from then on, a new
    generation of that many steps starts at the next transformer call. Returns the undo."""
    own = scheduler.__dict__.get("set_timesteps")
    set_timesteps = scheduler.set_timesteps

    @functools.wraps(set_timesteps)  # pipelines inspect its signature
    def watched_set_timesteps(*args: Any, **kwargs: Any) -> Any:
        result = set_timesteps(*args, **kwargs)
        tracker.start(len(scheduler.timesteps))
        return result

    scheduler.set_timesteps = watched_set_timesteps

    def unwatch() -> None:
        if own is None:
            del scheduler.set_timesteps
        else:
            scheduler.set_timesteps = own

    return unwatch
