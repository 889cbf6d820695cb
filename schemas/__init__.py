"""Pure-data models of cachekit: policy configs (and later presets, study specs, results)."""

from cachekit.schemas.configs import PolicyConfig, UniformConfig

__all__ = ["PolicyConfig", "UniformConfig"]
