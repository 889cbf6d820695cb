"""Pure-data models of cachekit (no torch): policy configs and presets."""

from cachekit.schemas.adapter import AdapterSpec
from cachekit.schemas.calibration import CalibrationSpec
from cachekit.schemas.configs import PolicyConfig, UniformConfig
from cachekit.schemas.pab import PAB_DEFAULTS, PAB_FALLBACK, Broadcast, MLPBroadcast, PABConfig
from cachekit.schemas.teacache import TeaCacheConfig, TeaCachePreset, load_preset, presets_for, teacache_presets

__all__ = [
    "PAB_DEFAULTS",
    "PAB_FALLBACK",
    "AdapterSpec",
    "Broadcast",
    "CalibrationSpec",
    "MLPBroadcast",
    "PABConfig",
    "PolicyConfig",
    "TeaCacheConfig",
    "TeaCachePreset",
    "UniformConfig",
    "load_preset",
    "presets_for",
    "teacache_presets",
]
