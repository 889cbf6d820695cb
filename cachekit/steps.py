"""Step and branch tracking from the model's own calls.

A new timestep value starts a new step; further calls at the same timestep are further CFG
branches, which a pipeline calls on the same noisy latent. A generation starts at the first call,
after `start()` (the pipeline's scheduler set new timesteps, or the user reset), when the
timestep goes back up (denoising never does), or when a call repeats the timestep on another
latent (a loop restarted at the same timestep). A call past the known number of steps at a lower
timestep is refused: either a pipeline cachekit does not watch drives the model, or a generation
started lower than the last one ended without a reset. The experts of a two-transformer pipeline
share one tracker, so their steps count through one generation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from cachekit.errors import StepCountError
from cachekit.policy import Step


class StepTracker:
    def __init__(self, num_steps: int | None) -> None:
        self.num_steps = num_steps
        self._timestep: float | None = None
        self._sample: torch.Tensor | None = None  # the latent of this step's first call
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

    def opens_generation(self, timestep: float, sample: torch.Tensor | None = None) -> bool:
        """Whether a call at `timestep` on the latent `sample` (if known) starts a new generation."""
        return (
            self._timestep is None
            or timestep > self._timestep
            or (timestep == self._timestep and not _same(sample, self._sample))
        )

    def advance(self, timestep: float, sample: torch.Tensor | None = None) -> Step:
        """The step of a call at `timestep` on the latent `sample`; `generation` counts up when it
        opens a new one."""
        if self.opens_generation(timestep, sample):
            self._index, self._branch = 0, 0
            self.generation += 1
            self._sample = sample
        elif timestep == self._timestep:
            self._branch += 1
        elif self.num_steps is not None and self._index + 1 >= self.num_steps:
            raise StepCountError(
                f"the transformer was called for step {self._index + 2} (timestep {timestep:g}) of a generation of "
                f"{self.num_steps} steps: a pipeline whose scheduler cachekit does not watch drives it (a transformer "
                "shared by two pipelines? apply the policy to the pipeline that runs it), the loop runs more steps "
                "than num_inference_steps says, or a new generation started lower than the last one ended "
                "(call handle.reset() between generations)"
            )
        else:
            self._index, self._branch = self._index + 1, 0
            self._sample = sample
        self._timestep = timestep
        return Step(self._index, self.num_steps, timestep, self._branch)


def _same(sample: torch.Tensor | None, other: torch.Tensor | None) -> bool:
    """Whether two calls were made on the same latent (unknown counts as the same)."""
    if sample is None or other is None or sample is other:
        return True
    return sample.shape == other.shape and bool(torch.equal(sample, other))


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
