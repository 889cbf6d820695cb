"""Pure-data models of cachekit (no torch): strategy and estimator configs, presets, specs.

Every module's public names are exported here (its `__all__`, else the classes and functions it
defines), found on first use: a new strategy's config is one module in this folder, nothing else.

    from cachekit.schemas import UniformConfig, TeaCacheConfig
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any


def _exports() -> dict[str, Any]:
    """Name -> object, over every module of the package."""
    found: dict[str, Any] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        names = getattr(module, "__all__", None) or [
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (inspect.isclass(value) or callable(value))
            and getattr(value, "__module__", None) == module.__name__
        ]
        for name in names:
            if name in found and found[name] is not getattr(module, name):
                raise ImportError(f"cachekit.schemas: {name!r} is defined in two modules; rename one")
            found[name] = getattr(module, name)
    return found


def __getattr__(name: str) -> Any:
    exports = _exports()
    if name not in exports:
        raise AttributeError(f"module 'cachekit.schemas' has no attribute {name!r}")
    globals().update(exports)
    return exports[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *_exports()})
