"""Tiny example models that adapters ship, so the conformance tests cover every adapter.

An adapter's `example()` builds its model family at a toy size with random weights and says how
to call it; the tests then run every registered strategy on it, plugins' adapters included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ModelExample:
    """A tiny model and how to call it.

    `inputs(latents, timestep, branch)` gives the call's keyword arguments at a timestep on the
    0-1000 scale, for CFG branch 0 (conditional) or 1 (unconditional).
    """

    model: nn.Module
    latents: torch.Tensor
    inputs: Callable[[torch.Tensor, float, int], dict[str, Any]]

    def denoise(self, steps: int = 6, guidance: float = 3.0) -> torch.Tensor:
        """A plain Euler loop from the example's latents over `steps` timesteps from 1000 down,
        with CFG as two calls per step (conditional first): what the tests drive a model with."""
        latents = self.latents.clone()
        with torch.no_grad():
            for index in range(steps):
                t = 1000.0 * (1 - index / steps)
                cond, uncond = self(latents, t, 0), self(latents, t, 1)
                latents = latents - (uncond + guidance * (cond - uncond)) / steps
        return latents

    def __call__(self, latents: torch.Tensor, timestep: float, branch: int = 0) -> torch.Tensor:
        """The model's prediction, cut to the latents' channels (some models also predict a variance)."""
        output = self.model(**self.inputs(latents, timestep, branch), return_dict=False)[0]
        return output if output.shape == latents.shape else output[:, : latents.shape[1]]
