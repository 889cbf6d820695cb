"""`cachekit.apply`: the single entry point, and the handle that undoes it."""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

from cachekit.adapter import Adapter
from cachekit.budget import BudgetError
from cachekit.budget import resolve as resolve_budget
from cachekit.errors import AlreadyAttachedError, BranchLevelError, HandleRemovedError
from cachekit.registry import get_estimator, get_strategy, make_config, resolve_adapter
from cachekit.runtime import Runtime
from cachekit.schemas.configs import StrategyConfig
from cachekit.stats import CacheStats
from cachekit.steps import StepTracker, watch_scheduler
from cachekit.strategy import Strategy

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, CacheHandle] = weakref.WeakKeyDictionary()


class CacheHandle:
    """A strategy attached to a model, or to each transformer of a pipeline. Use as a context
    manager, or call `.remove()`.

    A pipeline with two experts (Wan 2.2: `transformer` for the noisy steps, `transformer_2` for
    the rest) gets one strategy instance per expert, each with its own state and stats, on one step
    count: `stats` is the first expert's, `stats_by_component` has both. Stats stay readable after
    removal; everything else then raises.
    """

    def __init__(self, runtimes: dict[str, Runtime], scheduler: Any | None) -> None:
        self._runtimes = runtimes
        self._removed = False
        tracker, adapter = self._runtime.tracker, self._runtime.adapter
        self._unwatch = watch_scheduler(scheduler, tracker, adapter) if scheduler is not None else None

    @property
    def _runtime(self) -> Runtime:
        """The first transformer's: the one `strategy`, `adapter` and `stats` speak for."""
        return next(iter(self._runtimes.values()))

    @property
    def strategy(self) -> Strategy[Any]:
        return self._runtime.strategy

    @property
    def adapter(self) -> Adapter:
        return self._runtime.adapter

    @property
    def stats(self) -> CacheStats:
        return self._runtime.stats

    @property
    def stats_by_component(self) -> dict[str, CacheStats]:
        """Stats per hooked transformer, by pipeline component name ("transformer" for a bare one)."""
        return {name: runtime.stats for name, runtime in self._runtimes.items()}

    def summary(self) -> str:
        """A readable account of what the strategy did, per transformer (`print(handle.stats)` for one)."""
        if len(self._runtimes) == 1:
            return str(self.stats)
        return "\n".join(f"[{name}] {stats}" for name, stats in self.stats_by_component.items())

    def reset(self) -> None:
        """Start a new generation at the next call (drops every branch's state and residual)."""
        self._check()
        self._runtime.tracker.start()

    def remove(self) -> None:
        """Detach the strategy; the model behaves exactly as before `apply`."""
        self._check()
        for runtime in self._runtimes.values():
            runtime.uninstall()
            del _ATTACHED[runtime.model]
        if self._unwatch is not None:
            self._unwatch()
        self._removed = True

    def __enter__(self) -> CacheHandle:
        self._check()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "attached"
        return f"<CacheHandle {self.stats.strategy} on {self.stats.adapter} ({state})>"

    def _check(self) -> None:
        if self._removed:
            raise HandleRemovedError("this CacheHandle was removed; call cachekit.apply(...) again for a new one")


def apply(
    target: Any, config: StrategyConfig | Mapping[str, Any] | str | os.PathLike[str], process_group: Any = None
) -> CacheHandle:
    """Attach the strategy `config` describes to a diffusers pipeline or its transformer.

    `config` is a config object (`UniformConfig(interval=2)`), a dict with a ``strategy`` key, a
    JSON/TOML file, or a strategy name for its defaults. `process_group`: the ranks that share each
    generation (context parallelism not set up through diffusers, e.g. xDiT); the strategy's
    signals are reduced over it so every rank decides alike. Unset: diffusers' context-parallel
    group of the model, if any.
    """
    config = make_config(config)
    strategy_class = get_strategy(config.strategy)
    models, scheduler = _split_target(target)
    tuned, knob = None, strategy_class.knob
    if config.spending() is not None:  # the knob from the setting tuned for this budget on this model
        if knob is None:
            raise BudgetError(f"strategy {config.strategy!r} declares no knob, so it cannot be given a budget")
        first = next(iter(models.values()))
        config, tuned = resolve_budget(config, knob.field, resolve_adapter(first)(first).identity())
    for model in models.values():
        if model in _ATTACHED:
            raise AlreadyAttachedError(
                f"{type(model).__name__} already has a cache strategy attached ({_ATTACHED[model]!r}); "
                "remove that handle first"
            )
    tracker = StepTracker(config.num_inference_steps)  # experts share the steps of one generation
    estimator_class = get_estimator(config.estimator.kind)
    if estimator_class.predictions_only:
        raise BranchLevelError(
            f"estimator {config.estimator.kind!r} takes a model's predictions (the difference between CFG branches), "
            f"not the residuals or module outputs strategy {config.strategy!r} keeps: give it as the branch level's "
            f"estimator (branches={{'estimator': {config.estimator.kind!r}}}), and another kind as `estimator`"
        )
    branches = config.branches
    runtimes = {}
    for name, model in models.items():
        adapter = resolve_adapter(model)(model)
        strategy = strategy_class(config)
        runtimes[name] = Runtime(
            model,
            adapter,
            strategy,
            estimator_class(config.estimator),
            tracker,
            process_group,
            branch_estimator=None if branches is None else get_estimator(branches.estimator.kind)(branches.estimator),
        )
    # after attach, which may settle defaults from the model (a preset that forces the last step)
    needs_num_steps = any(runtime.strategy.needs_num_steps for runtime in runtimes.values())
    if needs_num_steps and scheduler is None and config.num_inference_steps is None:
        raise ValueError(
            f"strategy {config.strategy!r} must know the generation's length: apply it to the pipeline, or set "
            "num_inference_steps in its config when applying it to a bare transformer"
        )
    if tuned is not None and knob is not None:
        for runtime in runtimes.values():
            runtime.frames.tuned_steps = tuned.steps
            runtime.stats.info["budget"] = (
                f"{tuned.budget:.0%} tuned at {tuned.steps} steps: {knob.show(tuned.value)}, spent "
                f"{tuned.spent:.1%} and {tuned.metric} {tuned.quality:.4g} on held-out seeds"
            )
    installed: list[Runtime] = []
    try:
        for runtime in runtimes.values():
            installed.append(runtime)
            runtime.install()
    except BaseException:  # leave the model as found
        for runtime in reversed(installed):
            runtime.uninstall()
        raise
    handle = CacheHandle(runtimes, scheduler)
    for model in models.values():
        _ATTACHED[model] = handle
    return handle


def _split_target(target: Any) -> tuple[dict[str, nn.Module], Any | None]:
    """The transformers to hook, by component name (a torch.compile wrapper unwrapped: the hooks go
    on the model it compiles), and for a pipeline its scheduler."""
    if isinstance(target, nn.Module):
        found: dict[str, Any] = {"transformer": target}
        scheduler = None
    else:
        found = {name: getattr(target, name, None) for name in ("transformer", "transformer_2")}
        scheduler = getattr(target, "scheduler", None)
    models = {name: getattr(model, "_orig_mod", model) for name, model in found.items() if isinstance(model, nn.Module)}
    if not models:
        raise TypeError(
            "cachekit.apply takes a diffusers pipeline with a `transformer` or a transformer module, "
            f"got {type(target).__name__}"
        )
    for model in models.values():
        enabled = getattr(model, "_cache_config", None)
        if enabled is not None:
            raise AlreadyAttachedError(
                f"{type(model).__name__} has diffusers' {type(enabled).__name__} enabled (enable_cache): two caches "
                "would skip on top of each other; call its disable_cache() first"
            )
    return models, scheduler
