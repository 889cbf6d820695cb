"""Which strategies, estimators, adapters and metrics exist.

Every plugin listed under the entry-point group ``cachekit`` (the built-ins included) is loaded
once, on first use, each in isolation: a plugin that fails to import or to register is reported
by name and the others still load. An entry point may name a package that implements no hook
itself: each of its modules is then a plugin, found by the package (the built-ins are four such
packages: a new built-in strategy is a module in `strategies/`, nothing else). `register_plugin`
adds one from code through the same hooks.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import os
import pkgutil
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
from torch import nn

from cachekit import hookspecs
from cachekit.adapter import Adapter, model_class_name
from cachekit.errors import PluginError, UnknownEstimatorError, UnknownStrategyError, UnsupportedModelError
from cachekit.estimator import Estimator
from cachekit.metric import Metric
from cachekit.schemas.configs import StrategyConfig
from cachekit.schemas.estimators import EstimatorConfig, PluginEstimatorConfig
from cachekit.schemas.files import SUFFIXES, read_table
from cachekit.schemas.named import NamedConfig
from cachekit.strategy import Strategy

ENTRY_POINT_GROUP = "cachekit"


@dataclass(frozen=True)
class Kind:
    """One kind of thing plugins register: its hook, base class, name and checks."""

    word: str  # as errors name it
    hook: str
    base: type
    table: str  # the registry's dict of them
    name_of: Callable[[Any], str]
    check: Callable[[Any], None]


def _fixed_config(config_base: type[NamedConfig]) -> Callable[[Any], None]:
    """A check that a registered class's `config_class` is a `config_base` whose name is fixed."""

    def check(registered: Any) -> None:
        config = getattr(registered, "config_class", object)
        if not (isinstance(config, type) and issubclass(config, config_base)):
            raise PluginError(f"{registered.__name__}.config_class must be a {config_base.__name__} subclass")
        field = config.name_field
        if not isinstance(config.model_fields[field].default, str):
            raise PluginError(f"{config.__name__} must fix its {field} name: {field}: Literal['my_name'] = 'my_name'")

    return check


def _metric_name(metric: Any) -> None:
    name = getattr(metric, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_.]*", name):
        raise PluginError(f"{metric.__name__}.name must be a lower-case name like 'clip_score', got {name!r}")


KINDS = (
    Kind(
        "strategy",
        "cachekit_register_strategies",
        Strategy,
        "strategies",
        lambda s: s.name(),
        _fixed_config(StrategyConfig),
    ),
    Kind("adapter", "cachekit_register_adapters", Adapter, "adapters", lambda a: a.name, lambda _: None),
    Kind(
        "estimator",
        "cachekit_register_estimators",
        Estimator,
        "estimators",
        lambda e: e.name(),
        _fixed_config(EstimatorConfig),
    ),
    Kind("metric", "cachekit_register_metrics", Metric, "metrics", lambda m: m.name, _metric_name),
)


class PluginWarning(UserWarning):
    """A plugin failed to load, or adds nothing (a misspelt hook); the others are unaffected."""


class Registry:
    def __init__(self) -> None:
        self._plugins = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self._plugins.add_hookspecs(hookspecs)
        self.strategies: dict[str, type[Strategy[Any]]] = {}
        self.adapters: dict[str, type[Adapter]] = {}
        self.estimators: dict[str, type[Estimator[Any]]] = {}
        self.metrics: dict[str, type[Metric]] = {}
        self._origin: dict[tuple[str, str], str] = {}  # (kind, name) -> plugin that registered it
        #: Plugin name -> why it failed to load or register.
        self.errors: dict[str, str] = {}

    def load_entry_points(self) -> None:
        """Every installed plugin; cachekit's own first, so a plugin that claims a built-in name is
        the one refused."""
        found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for entry_point in sorted(found, key=lambda entry_point: not entry_point.value.startswith("cachekit.")):
            try:
                plugin = entry_point.load()
            except Exception as exc:  # a broken plugin must not break the others
                self._fail(entry_point.name, f"import of {entry_point.value!r} raised {exc!r}")
                continue
            if hasattr(plugin, "__path__") and not _implements_hooks(plugin):
                self.add_package(plugin)
            else:
                self.add(plugin, entry_point.name)

    def add_package(self, package: ModuleType) -> None:
        """Each module of `package` as a plugin named by its import name (a strategy and an estimator
        may share a module name), in name order."""
        for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda module: module.name):
            if module.name.startswith("_"):
                continue
            qualified = f"{package.__name__}.{module.name}"
            try:
                plugin = importlib.import_module(qualified)
            except Exception as exc:
                self._fail(qualified, f"import of {qualified!r} raised {exc!r}")
                continue
            self.add(plugin, qualified, helpers_allowed=True)

    def add(self, plugin: object, name: str, helpers_allowed: bool = False) -> None:
        """Register `plugin` under `name` and run its registration hooks. A plugin that implements
        no hook is named (a misspelt hook, a missing `@hookimpl`), but for a package's helper
        module (`helpers_allowed`) that defines no `cachekit_*` name at all."""
        try:
            self._plugins.register(plugin, name=name)
        except Exception as exc:
            self._fail(name, str(exc))
            return
        if not self._implements_a_hook(plugin, name, helpers_allowed):
            return
        for kind in KINDS:
            for impl in getattr(self._plugins.hook, kind.hook).get_hookimpls():
                if impl.plugin_name != name:
                    continue
                try:
                    impl.function(register=functools.partial(self._add, kind, name))
                except Exception as exc:
                    self._fail(name, f"{kind.hook} raised {exc!r}")

    def _implements_a_hook(self, plugin: object, name: str, helpers_allowed: bool) -> bool:
        """Whether `plugin` implements a hook; if not, say why not where it seems meant to."""
        hooks = [kind.hook for kind in KINDS]
        implemented = [hook for hook in hooks if any(i.plugin_name == name for i in self._hookimpls(hook))]
        defined = sorted(a for a in dir(plugin) if a.startswith("cachekit_") and callable(getattr(plugin, a, None)))
        for attribute in defined:
            if attribute not in hooks:
                close = difflib.get_close_matches(attribute, hooks, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self._fail(name, f"{attribute!r} is no cachekit hook{hint}; the hooks are: {', '.join(hooks)}")
            elif attribute not in implemented:
                self._fail(name, f"{attribute} is not marked @cachekit.hookimpl, so cachekit never calls it")
        if not implemented and not (helpers_allowed and not defined):
            if not defined:
                self._fail(name, f"it implements no cachekit hook ({', '.join(hooks)}): it adds nothing")
            return False
        return True

    def _hookimpls(self, hook: str) -> list[Any]:
        return list(getattr(self._plugins.hook, hook).get_hookimpls())

    def _add(self, kind: Kind, plugin: str, thing: Any) -> None:
        """`thing`, registered by `plugin` as one of `kind`, checked and claimed under its name."""
        if not (isinstance(thing, type) and issubclass(thing, kind.base)):
            base = kind.base.__name__
            raise PluginError(
                f"registered {thing!r}, which is not {'an' if base[0] in 'AEIOU' else 'a'} {base} subclass"
            )
        kind.check(thing)
        name = kind.name_of(thing)
        self._claim(kind.word, name, plugin)
        getattr(self, kind.table)[name] = thing

    def _claim(self, kind: str, name: str, plugin: str) -> None:
        owner = self._origin.setdefault((kind, name), plugin)
        if owner != plugin:
            raise PluginError(
                f"plugin {plugin!r} registers {kind} {name!r}, which plugin {owner!r} already registered; rename it"
            )

    def _fail(self, plugin: str, reason: str) -> None:
        self.errors[plugin] = reason
        warnings.warn(f"cachekit plugin {plugin!r} failed to load: {reason}", PluginWarning, stacklevel=3)


def _implements_hooks(plugin: object) -> bool:
    return any(name.startswith("cachekit_") and callable(getattr(plugin, name)) for name in dir(plugin))


@functools.cache
def registry() -> Registry:
    """The process-wide registry, with every installed plugin loaded."""
    loaded = Registry()
    loaded.load_entry_points()
    return loaded


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Add a plugin defined in code (a module or an object with hook implementations)."""
    registry().add(plugin, name or str(getattr(plugin, "__name__", type(plugin).__name__)))


def list_strategies() -> list[str]:
    return sorted(registry().strategies)


def list_adapters() -> list[str]:
    return sorted(registry().adapters)


def list_estimators() -> list[str]:
    return sorted(registry().estimators)


def list_metrics() -> list[str]:
    return sorted(registry().metrics)


def plugin_errors() -> dict[str, str]:
    """Plugins that failed to load, each with the reason."""
    return dict(registry().errors)


def get_strategy(name: str) -> type[Strategy[Any]]:
    strategies = registry().strategies
    if name not in strategies:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; known strategies: {', '.join(sorted(strategies)) or 'none'}"
        )
    return strategies[name]


def get_estimator(name: str) -> type[Estimator[Any]]:
    estimators = registry().estimators
    if name not in estimators:
        raise UnknownEstimatorError(
            f"unknown estimator kind {name!r}; known kinds: {', '.join(sorted(estimators)) or 'none'}"
        )
    return estimators[name]


def resolve_adapter(model: nn.Module) -> type[Adapter]:
    """The adapter for `model`: among those that match, the one for the most derived class."""
    if hasattr(model, "_orig_mod"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a torch.compile wrapper: pass the model it wraps (its `_orig_mod`), or "
            "compile the blocks instead (`block.compile()`), which cachekit supports"
        )
    mro = type(model).__mro__
    candidates = [adapter for adapter in registry().adapters.values() if adapter.matches(model)]
    if not candidates:
        supported = sorted({model_class_name(adapter) for adapter in registry().adapters.values()})
        raise UnsupportedModelError(
            f"no cachekit adapter supports {type(model).__name__}; supported models: {', '.join(supported) or 'none'}"
        )
    return min(candidates, key=lambda adapter: mro.index(adapter.model_class))


def make_config(config: StrategyConfig | Mapping[str, Any] | str | os.PathLike[str]) -> StrategyConfig:
    """A validated config from a config object, a dict with a ``strategy`` key, a JSON or TOML
    file, or a bare strategy name (its defaults); its estimator validated against the registry."""
    if isinstance(config, StrategyConfig):
        expected = get_strategy(config.strategy).config_class
        if not isinstance(config, expected):
            raise TypeError(f"strategy {config.strategy!r} takes a {expected.__name__}, got {type(config).__name__}")
        return _with_registered_estimator(config)
    if isinstance(config, os.PathLike) or (isinstance(config, str) and config.endswith((".json", ".toml"))):
        return make_config(_read_config_file(Path(config)))
    if isinstance(config, str) and (Path(config).suffix or os.sep in config):
        raise UnknownStrategyError(
            f"{config!r} is neither a strategy name nor a config file cachekit reads: give a .json or .toml file, "
            f"or a strategy name ({', '.join(list_strategies())})"
        )
    if isinstance(config, str):
        return make_config(get_strategy(config).config_class.model_validate({"strategy": config}))
    if isinstance(config, Mapping):
        if "strategy" not in config:
            raise ValueError(
                f"a strategy config needs a 'strategy' key; known strategies: {', '.join(list_strategies())}"
            )
        return make_config(get_strategy(config["strategy"]).config_class.model_validate(dict(config)))
    raise TypeError(
        f"a strategy config must be a StrategyConfig, a dict with a 'strategy' key, a .json/.toml path "
        f"or a strategy name, got {type(config).__name__}"
    )


def _with_registered_estimator(config: StrategyConfig) -> StrategyConfig:
    """`config` with its estimators (the strategy's, the branch level's) validated by the config
    class each kind registered."""
    update: dict[str, Any] = {}
    estimator = _registered(config.estimator)
    if estimator is not config.estimator:
        update["estimator"] = estimator
    branches = config.branches
    if branches is not None and _registered(branches.estimator) is not branches.estimator:
        update["branches"] = branches.model_copy(update={"estimator": _registered(branches.estimator)})
    return config.model_copy(update=update) if update else config


def _registered(estimator: EstimatorConfig) -> EstimatorConfig:
    expected = get_estimator(estimator.kind).config_class
    if isinstance(estimator, expected):
        return estimator
    if not isinstance(estimator, PluginEstimatorConfig):
        raise TypeError(f"estimator {estimator.kind!r} takes a {expected.__name__}, got {type(estimator).__name__}")
    return expected.model_validate(estimator.fields())


def _read_config_file(path: Path) -> dict[str, Any]:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: a strategy config file must end in .json or .toml")
    return read_table(path)
