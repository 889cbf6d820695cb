"""Test helpers that look at models from the outside, independently of cachekit."""

from __future__ import annotations

import torch
from torch import nn


class ExecutionCounter:
    """Counts real executions of modules inside the blocks with plain torch forward hooks."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.count = 0
        self._handles = [module.register_forward_hook(self._hit) for module in modules]

    def _hit(self, *_: object) -> None:
        self.count += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def module_state(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The instance attributes of every submodule: what apply/remove must leave as found."""
    return {name: tuple(sorted(vars(module))) for name, module in model.named_modules()}


def flux_inputs(batch: int = 1, timestep: float = 1.0, seed: int = 0) -> dict[str, object]:
    """Keyword arguments for one call of `cachekit.testing.tiny_flux_transformer()`."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 16, 4, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 4, 32, generator=generator),
        "pooled_projections": torch.randn(batch, 32, generator=generator),
        "timestep": torch.full((batch,), timestep),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(4, 3),
        "return_dict": False,
    }
