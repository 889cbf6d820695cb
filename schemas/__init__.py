"""Pure-data models of cachekit (no torch): policy configs and presets."""

from cachekit.schemas.adapter import AdapterSpec
from cachekit.schemas.calibration import CalibrationSpec
from cachekit.schemas.configs import PolicyConfig, UniformConfig
from cachekit.schemas.easycache import EasyCacheConfig
from cachekit.schemas.estimators import CopyConfig, EstimatorConfig, FoCaConfig, TaylorConfig
from cachekit.schemas.fbcache import FBCacheConfig
from cachekit.schemas.magcache import MagCacheConfig, MagCachePreset, load_magcache_preset, magcache_presets
from cachekit.schemas.pab import (
    PAB_DEFAULTS,
    PAB_FALLBACK,
    PAB_GATED,
    PAB_MLP_DEFAULTS,
    Broadcast,
    MLPBroadcast,
    MLPBroadcastAt,
    PABConfig,
)
from cachekit.schemas.seacache import SeaCacheConfig
from cachekit.schemas.taylorseer import TaylorSeerConfig
from cachekit.schemas.teacache import TeaCacheConfig, TeaCachePreset, load_preset, presets_for, teacache_presets

__all__ = [
    "PAB_DEFAULTS",
    "PAB_FALLBACK",
    "PAB_GATED",
    "PAB_MLP_DEFAULTS",
    "AdapterSpec",
    "Broadcast",
    "CalibrationSpec",
    "CopyConfig",
    "EasyCacheConfig",
    "EstimatorConfig",
    "FBCacheConfig",
    "FoCaConfig",
    "MLPBroadcast",
    "MLPBroadcastAt",
    "MagCacheConfig",
    "MagCachePreset",
    "PABConfig",
    "PolicyConfig",
    "SeaCacheConfig",
    "TaylorConfig",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "TeaCachePreset",
    "UniformConfig",
    "load_magcache_preset",
    "load_preset",
    "magcache_presets",
    "presets_for",
    "teacache_presets",
]
