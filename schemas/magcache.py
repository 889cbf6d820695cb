"""MagCache's config and its published magnitude-ratio sets (data: magcache_presets.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from cachekit.schemas.configs import StrategyConfig
from cachekit.schemas.files import read_table
from cachekit.schemas.presets import Preset, Presets

__all__ = ["MAGCACHE_PRESETS", "MagCacheConfig", "MagCachePreset", "Ratios", "load_magcache_preset", "magcache_presets"]

Ratios = Annotated[tuple[Annotated[float, Field(gt=0)], ...], Field(min_length=2)]


class MagCachePreset(Preset):
    """Per-step magnitude ratios of one model: mean over tokens of |r_t| / |r_t-1|, r the residual
    of the block stack (the first step 1.0), with where they come from."""

    mag_ratios: Ratios

    @classmethod
    def from_file(cls, path: Path) -> MagCachePreset:
        """The ratios a file holds: a ratio set, or a calibrated TeaCache preset that measured them."""
        data = read_table(path)
        if not data.get("mag_ratios"):
            raise ValueError(f"{path} holds no mag_ratios: calibrate the model (`cachekit calibrate`) to measure them")
        shared = {name: data[name] for name in ("adapter", "identity", "notes") if data.get(name) is not None}
        return cls(name=data.get("name", path.stem), mag_ratios=data["mag_ratios"], **shared)


#: MagCache's ratio sets: those shipped (magcache_presets.toml) and calibrated files.
MAGCACHE_PRESETS = Presets("MagCache", MagCachePreset, "magcache_presets.toml")
magcache_presets = MAGCACHE_PRESETS.shipped
load_magcache_preset = MAGCACHE_PRESETS.load


class MagCacheConfig(StrategyConfig):
    """MagCache (arXiv 2506.09045): skip the block stack while the error accumulated from the
    product of per-step magnitude ratios stays within `threshold`, at most `max_skip_steps` in a
    row, never in the first `retention_ratio` of the steps; the ratios are measured once per model
    (`cachekit calibrate`) or taken from a published set."""

    model_config = ConfigDict(allow_inf_nan=False)

    strategy: Literal["magcache"] = "magcache"
    threshold: float = Field(default=0.06, ge=0, description="Skip while the accumulated error stays within this.")
    max_skip_steps: int = Field(default=3, ge=0, description="K: at most this many steps skipped in a row.")
    retention_ratio: float = Field(default=0.2, ge=0, lt=1, description="The share of first steps always computed.")
    mag_ratios: Ratios | None = Field(default=None, description="Per-step magnitude ratios, one per step.")
    preset: str | None = Field(
        default=None,
        description="A shipped ratio set's name, or a calibrated preset file. With neither this nor mag_ratios, "
        "the shipped set measured on the model is picked.",
    )
    interpolate: bool = Field(
        default=False,
        description="Resample ratios measured at another step count to this one by nearest index (as the "
        "published code does); otherwise their count must equal the generation's steps.",
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str | None) -> str | None:
        if preset is not None:
            load_magcache_preset(preset)
        return preset

    @model_validator(mode="after")
    def _ratios_from_one_place(self) -> MagCacheConfig:
        if self.mag_ratios is not None and self.preset is not None:
            raise ValueError("give mag_ratios or preset, not both")
        return self
