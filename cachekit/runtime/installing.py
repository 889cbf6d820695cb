"""Putting cachekit's hooks on a model's modules and taking them off, leaving every module as found
(its forward, its hook registry, and every other hook on it, in its order).

The transformer's own hook is a diffusers `ModelHook` (pipelines hand it their cache context
through the hook registry). Blocks and attention/MLP modules, called by the dozen in every
transformer call, are routed more cheaply: an instance `forward` that calls cachekit directly,
where the module carries no diffusers hooks; where it does (offloading, context parallelism), a
`ModelHook` beneath the context-parallel ones. Hooks diffusers adds later wrap cachekit's either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from cachekit.errors import UnsupportedModelError
from cachekit.runtime.placement import register_beneath_context_parallel, remove_keeping_the_rest

HOOK_NAME = "cachekit"


#: What a routed module's calls go through: run(forward, args, kwargs) -> output.
Route = Callable[[Callable[..., Any], tuple[Any, ...], Mapping[str, Any]], Any]


def _call_through(forward: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    return forward(*args, **kwargs)


class Installer:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._installed: list[tuple[nn.Module, str, bool, bool]] = []
        self._routed: list[tuple[nn.Module, Any, Any, list[Route]]] = []

    def route(self, module: nn.Module, run: Route) -> None:
        """Send `module`'s calls through `run(forward, args, kwargs)`, `forward` its own."""
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.hooks:
            self.hook(module, _RoutingHook(run))
            return
        own = module.__dict__.get("forward")
        original = module.forward
        current = [run]

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return current[0](original, args, kwargs)

        module.forward = forward
        self._routed.append((module, forward, own, current))

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
        for module, forward, own, current in reversed(self._routed):
            if module.__dict__.get("forward") is not forward:  # wrapped since by another: stays, inert
                current[0] = _call_through
            elif own is None:
                del module.forward
            else:
                module.forward = own
        self._routed.clear()
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


class _RoutingHook(ModelHook):
    """`Installer.route` as a diffusers hook, for a module that carries diffusers hooks already."""

    def __init__(self, run: Route) -> None:
        super().__init__()
        self.run = run

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.run(self.fn_ref.original_forward, args, kwargs)
