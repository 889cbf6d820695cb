"""cachekit's place among the diffusers hooks on a module.

Under context parallelism diffusers splits a module's inputs over the ranks and gathers its
outputs with hooks of its own (`cp_input---...`, `cp_output---...`). cachekit's hooks must see
what the module itself sees, so they go beneath those hooks whichever was registered first. And
diffusers' `HookRegistry.remove_hook` on a hook that is not the outermost one loses the hook
above it; so a hook is removed by taking off the hooks above it first and putting them back.
"""

from __future__ import annotations

from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

#: Name prefixes of diffusers' context-parallel split and gather hooks.
CONTEXT_PARALLEL_HOOKS = ("cp_input---", "cp_output---")


def context_parallel_group(model: nn.Module) -> Any:
    """The process group of the model's context parallelism (ring x Ulysses; never the whole world,
    nor a data- or CFG-parallel group), or None when diffusers' context parallelism is off."""
    config = getattr(model, "_parallel_config", None)
    mesh = getattr(getattr(config, "context_parallel_config", None), "_flattened_mesh", None)
    return mesh.get_group() if mesh is not None else None


def register_beneath_context_parallel(registry: HookRegistry, hook: ModelHook, name: str) -> None:
    """Register `hook` as `name`, inside any context-parallel hook already on the module."""
    order = list(registry._hook_order)
    first = next((i for i, other in enumerate(order) if other.startswith(CONTEXT_PARALLEL_HOOKS)), len(order))
    with _lifted(registry, order[first:]):
        registry.register_hook(hook, name)


def remove_keeping_the_rest(registry: HookRegistry, name: str) -> None:
    """Remove the hook `name`, leaving every other hook on the module working, in its order."""
    order = list(registry._hook_order)
    if name not in order:
        return
    with _lifted(registry, order[order.index(name) + 1 :]):
        registry.remove_hook(name, recurse=False)


class _lifted:
    """Takes the hooks `names` (the outermost ones, innermost first) off the module, and puts them
    back in the same order on exit."""

    def __init__(self, registry: HookRegistry, names: list[str]) -> None:
        self.registry = registry
        self.hooks = [(name, registry.hooks[name]) for name in names]

    def __enter__(self) -> None:
        for name, _ in reversed(self.hooks):
            self.registry.remove_hook(name, recurse=False)

    def __exit__(self, *exc_info: object) -> None:
        for name, hook in self.hooks:
            self.registry.register_hook(hook, name)
