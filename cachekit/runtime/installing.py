"""Putting cachekit's hooks on a model's modules and taking them off, leaving every module as found
(its forward, its hook registry, and every other hook on it, in its order)."""

from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from cachekit.errors import UnsupportedModelError
from cachekit.hooks import register_beneath_context_parallel, remove_keeping_the_rest

HOOK_NAME = "cachekit"


class Installer:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._installed: list[tuple[nn.Module, str, bool, bool]] = []

    def hook(self, module: nn.Module, hook: ModelHook, name: str = HOOK_NAME) -> None:
        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        try:
            register_beneath_context_parallel(HookRegistry.check_if_exists_or_initialize(module), hook, name)
        except BaseException:
            if not had_registry and hasattr(module, "_diffusers_hook"):
                del module._diffusers_hook  # the registry made for a hook that did not go in
            raise
        self._installed.append((module, name, had_registry, had_forward))

    def uninstall(self) -> None:
        """Remove every hook and whatever the hook registry added."""
        for module, name, had_registry, had_forward in reversed(self._installed):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            remove_keeping_the_rest(registry, name)
            if not registry.hooks:
                if not had_forward:
                    del module.forward  # the registry leaves the original bound method behind
                if not had_registry:
                    del module._diffusers_hook
        self._installed.clear()
        self.forget_cached_children()

    def forget_cached_children(self) -> None:
        """diffusers caches which submodules carry hooks; ours just changed."""
        registry = getattr(self.model, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()


def each_once(model: nn.Module, modules: list[nn.Module], what: str) -> None:
    """One module at two places (weight-tied blocks, a block list named twice) cannot be told
    apart between its calls: refuse it, naming where it appears."""
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    seen: dict[int, int] = {}
    for index, module in enumerate(modules):
        if id(module) in seen:
            raise UnsupportedModelError(
                f"{type(model).__name__}: the same {what} ({names.get(id(module), type(module).__name__)!r}) appears "
                f"at positions {seen[id(module)]} and {index}: cachekit keeps state per {what} and cannot tell "
                "the calls of a module used twice apart (weight-tied blocks are not supported)"
            )
        seen[id(module)] = index
