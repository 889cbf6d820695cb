"""cachekit: training-free, strategy-pluggable caching for diffusion transformers.

    handle = cachekit.apply(pipe, cachekit.schemas.UniformConfig(interval=2))
    image = pipe(prompt).images[0]
    print(handle.stats.last)
    handle.remove()
"""

from cachekit.adapter import Adapter, AttentionKind, AttentionSite, BlockStreams, Point, ResidualSpan
from cachekit.errors import (
    AlreadyAttachedError,
    CachekitError,
    HandleRemovedError,
    MissingPointError,
    PluginError,
    PolicyError,
    UnknownStrategyError,
    UnsupportedModelError,
)
from cachekit.handle import CacheHandle, apply
from cachekit.hookspecs import hookimpl
from cachekit.policy import CachePolicy, Signals, Step
from cachekit.registry import (
    get_strategy,
    list_adapters,
    list_strategies,
    make_config,
    plugin_errors,
    register_plugin,
    resolve_adapter,
)
from cachekit.stats import BranchStats, CacheStats, GenerationStats, SiteCounts

__all__ = [
    "Adapter",
    "AlreadyAttachedError",
    "AttentionKind",
    "AttentionSite",
    "BlockStreams",
    "BranchStats",
    "CacheHandle",
    "CachePolicy",
    "CacheStats",
    "CachekitError",
    "GenerationStats",
    "HandleRemovedError",
    "MissingPointError",
    "PluginError",
    "Point",
    "PolicyError",
    "ResidualSpan",
    "Signals",
    "SiteCounts",
    "Step",
    "UnknownStrategyError",
    "UnsupportedModelError",
    "apply",
    "get_strategy",
    "hookimpl",
    "list_adapters",
    "list_strategies",
    "make_config",
    "plugin_errors",
    "register_plugin",
    "resolve_adapter",
]
