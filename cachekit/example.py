"""Tiny example models that adapters ship, so the conformance tests cover every adapter.

An adapter's `example()` builds its model family at a toy size with random weights and says how
to call it; the tests then run every registered strategy on it, plugins' adapters included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from cachekit.declarative import DeclarativeAdapter


@dataclass
class ModelExample:
    """A tiny model and how to call it.

    `inputs(latents, timestep, branch)` gives the call's keyword arguments at a timestep on the
    0-1000 scale, for CFG branch 0 (conditional) or 1 (unconditional).
    """

    model: nn.Module
    latents: torch.Tensor
    inputs: Callable[[torch.Tensor, float, int], dict[str, Any]]

    def __call__(self, latents: torch.Tensor, timestep: float, branch: int = 0) -> torch.Tensor:
        """The model's prediction, cut to the latents' channels (some models also predict a variance)."""
        output = self.model(**self.inputs(latents, timestep, branch), return_dict=False)[0]
        return output if output.shape == latents.shape else output[:, : latents.shape[1]]


def image_ids(height: int, width: int) -> torch.Tensor:
    """Flux-style position ids (0, row, column) of a height x width grid of image tokens."""
    grid = torch.meshgrid(torch.zeros(1), torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    return torch.stack(grid).reshape(3, -1).T


def example_of(
    adapter: type[DeclarativeAdapter],
    build: Callable[[], nn.Module],
    latents: tuple[int, ...],
    conditions: dict[str, tuple[int, ...]],
    branch_values: dict[str, tuple[Any, Any]] | None = None,
    **constants: Any,
) -> ModelExample:
    """The usual example: `build()` seeded, random latents, random `conditions` per CFG branch
    (and `branch_values`: given values per branch), constant extra arguments; the timestep goes
    in the way the adapter's spec reads it back."""
    torch.manual_seed(0)  # the weights
    model = build().eval()
    generator = torch.Generator().manual_seed(0)  # the inputs
    spec = adapter.spec.timestep
    per_branch = [
        {name: torch.randn(shape, generator=generator) for name, shape in conditions.items()} for _ in range(2)
    ]
    for name, values in (branch_values or {}).items():
        for branch, value in zip(per_branch, values, strict=True):
            branch[name] = value

    def inputs(latents: torch.Tensor, t: float, branch: int) -> dict[str, Any]:
        timestep = torch.full((latents.shape[0],), (t - spec.offset) / spec.scale)
        return {"hidden_states": latents, spec.argument.name: timestep, **constants, **per_branch[branch]}

    return ModelExample(model, torch.randn(latents, generator=generator), inputs)
