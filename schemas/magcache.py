"""MagCache's config and its published magnitude-ratio sets (data: magcache_presets.toml)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cachekit.schemas.configs import StrategyConfig
from cachekit.schemas.files import SUFFIXES, parse_table, read_table

Ratios = Annotated[tuple[Annotated[float, Field(gt=0)], ...], Field(min_length=2)]


class MagCachePreset(BaseModel):
    """Per-step magnitude ratios of one model: mean over tokens of |r_t| / |r_t-1|, r the residual
    of the block stack (the first step 1.0), with where they come from."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    adapter: str = Field(description="The model family (adapter name) the ratios were measured on.")
    match: dict[str, Any] = Field(
        default_factory=dict, description="Transformer config values that identify the model, for picking it."
    )
    mag_ratios: Ratios
    identity: str | None = Field(default=None, description="The model a calibrated set was measured on.")
    notes: str = ""

    def fits(self, adapter: str, config: Mapping[str, Any]) -> bool:
        """Whether a transformer of family `adapter` with `config` is the model this was measured on."""
        return self.adapter == adapter and bool(self.match) and all(config.get(k) == v for k, v in self.match.items())


@functools.cache
def magcache_presets() -> dict[str, MagCachePreset]:
    """Every shipped ratio set by name."""
    data = parse_table(resources.files(__package__).joinpath("magcache_presets.toml").read_text(), ".toml")
    return {name: MagCachePreset(name=name, **fields) for name, fields in data.items()}


def load_magcache_preset(reference: str) -> MagCachePreset:
    """A shipped set by name, or a file (.json/.toml) holding a `mag_ratios` list, e.g. a calibrated preset."""
    if reference in magcache_presets():
        return magcache_presets()[reference]
    path = Path(reference)
    if path.suffix not in SUFFIXES or not path.is_file():
        raise ValueError(
            f"unknown MagCache preset {reference!r}: neither a preset file (.json/.toml) nor one of "
            f"{', '.join(magcache_presets())}"
        )
    data = read_table(path)
    if not data.get("mag_ratios"):
        raise ValueError(f"{path} holds no mag_ratios: calibrate the model (`cachekit calibrate`) to measure them")
    return MagCachePreset(
        name=data.get("name", path.stem),
        adapter=data.get("adapter", ""),
        mag_ratios=data["mag_ratios"],
        identity=data.get("identity"),
    )


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
