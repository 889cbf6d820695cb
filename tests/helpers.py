"""Test helpers that look at models from the outside, independently of cachekit."""

from __future__ import annotations

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
