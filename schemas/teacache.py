"""TeaCache's config and its published presets (the presets are data: teacache_presets.toml)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from cachekit.schemas.configs import StrategyConfig
from cachekit.schemas.presets import Preset, Presets

__all__ = ["TEACACHE_PRESETS", "TeaCacheConfig", "TeaCachePreset", "load_preset", "presets_for", "teacache_presets"]

#: The signal TeaCache measures: block 0's modulated input, the timestep embedding the blocks get,
#: or its projection into the blocks' modulation parameters (Wan's `timestep_proj`, the "ret steps" variant).
Probe = Literal["modulated_input", "timestep_embedding", "projected_timestep_embedding"]

#: A rescale polynomial, highest power first (as numpy.poly1d takes it): order 1 to 9.
Coefficients = Annotated[tuple[float, ...], Field(min_length=2, max_length=10)]


class TeaCachePreset(Preset):
    """Rescale coefficients for one model, with how they were fitted and where they apply."""

    adapter: str = Field(description="The model family (adapter name) the coefficients were fitted on.")
    coefficients: Coefficients
    probe: Probe = "modulated_input"
    warmup_steps: int = Field(default=1, ge=1, description="Steps always computed first.")
    warmup_share: float | None = Field(
        default=None, gt=0, lt=1, description="Or: the share of the steps always computed first (of 50: 0.1 -> 5)."
    )
    compute_last_step: bool = Field(default=True, description="Whether the last step always computes.")
    thresholds: tuple[float, ...] = Field(default=(), description="Suggested rel_l1_thresh, slowest first.")
    steps: int | None = Field(default=None, ge=1, description="The step count the thresholds were published for.")
    shared_with: str = Field(
        default="",
        description="Models whose transformer config equals the one matched but for which no set is published: "
        "picking this preset for them is reported.",
    )
    fit: dict[str, float] = Field(default_factory=dict, description="Calibration: rmse, r2, samples, order.")
    mag_ratios: tuple[float, ...] = Field(
        default=(),
        description="Calibration: per step, the mean over tokens of the block stack residual's norm over the "
        "previous step's (MagCache's magnitude ratios; 1.0 at the first step).",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> TeaCachePreset:
        if self.warmup_share is not None and "warmup_steps" in self.model_fields_set:
            raise ValueError(f"preset {self.name!r}: give warmup_steps or warmup_share, not both")
        return self


#: TeaCache's presets: those shipped (teacache_presets.toml) and calibrated files.
TEACACHE_PRESETS = Presets("TeaCache", TeaCachePreset, "teacache_presets.toml")
teacache_presets = TEACACHE_PRESETS.shipped
load_preset = TEACACHE_PRESETS.load
presets_for = TEACACHE_PRESETS.fitting


class TeaCacheConfig(StrategyConfig):
    """Skip the block stack while the accumulated, rescaled change of the probe stays below
    `rel_l1_thresh`; re-apply the last computed residual instead (TeaCache, arXiv 2411.19108).

    Fields left unset come from the preset: the named one, else the one that fits the model.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    strategy: Literal["teacache"] = "teacache"
    rel_l1_thresh: float | None = Field(
        default=None, gt=0, description="Compute once the accumulator reaches this. Unset: the preset's first."
    )
    coefficients: Coefficients | None = Field(default=None, description="Rescale polynomial, highest power first.")
    preset: str | None = Field(
        default=None, description="A preset name (cachekit.schemas.teacache_presets()) or a calibrated preset file."
    )
    probe: Probe | None = Field(default=None, description="Unset: the preset's, else modulated_input.")
    warmup_steps: int | None = Field(
        default=None, ge=1, description="Steps always computed first. Unset: the preset's, else 1."
    )
    warmup_share: float | None = Field(
        default=None, gt=0, lt=1, description="Or the share of the steps always computed first. Unset: the preset's."
    )
    compute_last_step: bool | None = Field(default=None, description="Unset: the preset's, else True.")
    allow_other_model: bool = Field(
        default=False,
        description="Use a preset on a model other than the one it was fitted on (another family, or another "
        "model than a calibrated preset's).",
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str | None) -> str | None:
        if preset is not None:
            load_preset(preset)
        return preset

    @model_validator(mode="after")
    def _coefficients_or_preset(self) -> TeaCacheConfig:
        if self.coefficients is not None and self.preset is not None:
            raise ValueError("give either coefficients or preset, not both")
        if self.coefficients is not None and self.rel_l1_thresh is None:
            raise ValueError("rel_l1_thresh is required with explicit coefficients")
        if self.warmup_steps is not None and self.warmup_share is not None:
            raise ValueError("give warmup_steps or warmup_share, not both")
        return self
