"""diffusers' own caching methods, run through diffusers' hooks, as baselines beside cachekit's.

diffusers' cache hooks keep their state per cache context (a name per CFG branch, and for some
the step and sigma), which each pipeline sets in its own way or not at all. Here a hook outside
theirs sets that context on every call from the model's own calls (the step and branch the way
cachekit's runtime tracks them), and resets their state when a generation starts, so the same
method runs the same way in any pipeline, a testbed model's included.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    ModelHook,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
)
from torch import nn

from cachekit.adapter import Adapter
from cachekit.registry import resolve_adapter
from cachekit.schemas.diffusers_methods import (
    DIFFUSERS_METHODS,
    DiffusersFirstBlockCache,
    DiffusersMagCache,
    DiffusersMethodConfig,
    DiffusersPAB,
    DiffusersSeaCache,
    DiffusersTaylorSeer,
)
from cachekit.schemas.magcache import load_magcache_preset
from cachekit.steps import StepTracker, watch_scheduler
from cachekit.strategy import Knob

CONTEXT_HOOK = "cachekit_peer_context"
#: The field a budget tunes, per method: searched as cachekit's strategies' knobs are.
KNOBS: dict[type[DiffusersMethodConfig], Knob] = {
    DiffusersFirstBlockCache: Knob("threshold"),
    DiffusersMagCache: Knob("threshold"),
    DiffusersTaylorSeer: Knob("cache_interval", integer=True),
    DiffusersSeaCache: Knob("threshold"),
    DiffusersPAB: Knob("spatial_attention_block_skip_range", integer=True),
}


def make_diffusers_method_config(values: DiffusersMethodConfig | dict[str, Any]) -> DiffusersMethodConfig:
    """A validated diffusers-method config from a config or a dict with its ``strategy``."""
    if isinstance(values, DiffusersMethodConfig):
        return values
    strategy = values.get("strategy")
    if strategy not in DIFFUSERS_METHODS:
        raise LookupError(f"unknown diffusers method {strategy!r}; known: {', '.join(sorted(DIFFUSERS_METHODS))}")
    return DIFFUSERS_METHODS[strategy].model_validate(values)


def diffusers_config(config: DiffusersMethodConfig, adapter: Adapter, tracker: StepTracker) -> Any:
    """The diffusers config `config` stands for, on the model `adapter` reads."""
    fields = config.model_dump(exclude={"strategy", "budget"})
    if isinstance(config, DiffusersFirstBlockCache):
        return FirstBlockCacheConfig(**fields)
    if isinstance(config, DiffusersMagCache):
        preset = fields.pop("preset")
        ratios = fields.pop("mag_ratios") or load_magcache_preset(preset).mag_ratios
        if fields["num_inference_steps"] is None:
            raise ValueError("diffusers.mag_cache needs num_inference_steps (a study fills in its steps)")
        return MagCacheConfig(**fields, mag_ratios=list(ratios))
    if isinstance(config, DiffusersTaylorSeer):
        fields["taylor_factors_dtype"] = getattr(torch, fields["taylor_factors_dtype"])
        return TaylorSeerCacheConfig(**fields)
    if isinstance(config, DiffusersSeaCache):

        def latents(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
            return list(adapter.latent(args, kwargs).unbind(0))

        return SeaCacheConfig(**fields, raw_vision_callback=latents)
    if isinstance(config, DiffusersPAB):
        return PyramidAttentionBroadcastConfig(**fields, current_timestep_callback=lambda: tracker.timestep)
    raise TypeError(f"no diffusers method for {type(config).__name__}")


class DiffusersMethodHandle:
    """A diffusers method enabled on a transformer; `.remove()` disables it again."""

    stats = None  # diffusers' hooks count nothing a study could read; studies count executions themselves

    def __init__(self, transformer: Any, registry: HookRegistry, unwatch: Any) -> None:
        self._transformer = transformer  # a diffusers model: has enable_cache and disable_cache
        self._registry = registry
        self._unwatch = unwatch

    def remove(self) -> None:
        self._registry.remove_hook(CONTEXT_HOOK, recurse=False)
        self._transformer.disable_cache()
        if self._unwatch is not None:
            self._unwatch()

    def __enter__(self) -> DiffusersMethodHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def apply_diffusers_method(target: Any, config: DiffusersMethodConfig | dict[str, Any]) -> DiffusersMethodHandle:
    """Enable the diffusers method `config` names on a pipeline's transformer (or a transformer)."""
    config = make_diffusers_method_config(config)
    transformer: Any = target if isinstance(target, nn.Module) else target.transformer
    scheduler = None if isinstance(target, nn.Module) else getattr(target, "scheduler", None)
    adapter = resolve_adapter(transformer)(transformer)
    tracker = StepTracker(getattr(config, "num_inference_steps", None))
    transformer.enable_cache(diffusers_config(config, adapter, tracker))
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(_ContextHook(adapter, tracker), CONTEXT_HOOK)  # registered last: outermost
    unwatch = watch_scheduler(scheduler, tracker, adapter) if scheduler is not None else None
    return DiffusersMethodHandle(transformer, registry, unwatch)


class _ContextHook(ModelHook):
    """Sets diffusers' cache context of each call: branch name, step, step count, timestep, sigma."""

    def __init__(self, adapter: Adapter, tracker: StepTracker) -> None:
        super().__init__()
        self.adapter = adapter
        self.tracker = tracker

    def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        generation = self.tracker.generation
        timestep = functools.partial(self.adapter.step_of, args, kwargs)  # read only without a watched scheduler
        step = self.tracker.advance(timestep, self.adapter.latent_input(args, kwargs))
        if self.tracker.generation != generation:
            module._reset_stateful_cache()
        context = {
            "step_index": step.index,
            "num_inference_steps": step.num_steps,
            "timestep": step.timestep,
            "sigma": min(max(step.timestep / 1000, 0.0), 1.0),
        }
        with module.cache_context(f"branch{step.branch}", **context):
            return self.fn_ref.original_forward(*args, **kwargs)
