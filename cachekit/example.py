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

    def __call__(self, latents: torch.Tensor, timestep: float, branch: int = 0) -> torch.Tensor:
        """The model's prediction, cut to the latents' channels (some models also predict a variance)."""
        output = self.model(**self.inputs(latents, timestep, branch), return_dict=False)[0]
        return output if output.shape == latents.shape else output[:, : latents.shape[1]]


def seeded(seed: int = 0) -> torch.Generator:
    """Seed the global RNG (module init) and return a generator for the inputs."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def branches(generator: torch.Generator, **shapes: tuple[int, ...]) -> list[dict[str, torch.Tensor]]:
    """Random conditioning tensors of the given shapes for the two CFG branches."""
    return [{name: torch.randn(shape, generator=generator) for name, shape in shapes.items()} for _ in range(2)]


def timestep_tensor(value: float, batch: int = 1) -> torch.Tensor:
    return torch.full((batch,), value)


def example_of(
    adapter: Any,
    build: Callable[[], nn.Module],
    latents: tuple[int, ...],
    conditions: dict[str, tuple[int, ...]],
    branch_values: dict[str, tuple[Any, Any]] | None = None,
    **constants: Any,
) -> ModelExample:
    """The usual example: `build()` seeded, random latents, random `conditions` per CFG branch
    (and `branch_values`: given values per branch), constant extra arguments; the timestep goes
    in the way the adapter's spec reads it back."""
    generator = seeded()
    model = build().eval()
    spec = adapter.spec.timestep
    per_branch = branches(generator, **conditions)
    for name, values in (branch_values or {}).items():
        for branch, value in zip(per_branch, values, strict=True):
            branch[name] = value

    def inputs(latents: torch.Tensor, t: float, branch: int) -> dict[str, Any]:
        timestep = timestep_tensor((t - spec.offset) / spec.scale, latents.shape[0])
        return {"hidden_states": latents, spec.argument.name: timestep, **constants, **per_branch[branch]}

    return ModelExample(model, torch.randn(latents, generator=generator), inputs)
