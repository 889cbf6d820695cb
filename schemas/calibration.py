"""Calibration specs: which uncached runs to fit TeaCache's rescale polynomial on, and to tune on."""

from __future__ import annotations

from pathlib import PurePath

from pydantic import Field, model_validator

from cachekit.schemas.study import Generation
from cachekit.schemas.teacache import Probe


class CalibrationSpec(Generation):
    model: str = Field(min_length=1, description="A testbed name, or a diffusers pipeline id / local path.")
    order: int = Field(default=4, ge=1, le=9, description="Degree of the fitted polynomial.")
    probe: Probe = "modulated_input"
    held_out_seeds: list[int] = Field(default=[1000, 1001], min_length=1, description="Seeds the tuner measures on.")
    primary: str = Field(
        default="psnr",
        min_length=1,
        description="The metric `cachekit tune --quality` bounds (its direction, higher or lower better, is its own).",
    )
    name: str | None = Field(default=None, description="The preset's name. Unset: '<model>-calibrated'.")

    def preset_name(self) -> str:
        """`name`, else '<model>-calibrated' (the last part of the model's id or path)."""
        return self.name or f"{PurePath(self.model).name}-calibrated"

    @model_validator(mode="after")
    def _held_out_really_held_out(self) -> CalibrationSpec:
        shared = sorted(set(self.seeds) & set(self.held_out_seeds))
        if shared:
            raise ValueError(f"held_out_seeds {shared} are also calibration seeds")
        return self

    @model_validator(mode="after")
    def _enough_samples_for_the_fit(self) -> CalibrationSpec:
        # one sample per call after a branch's first: at least seeds x conditions x (steps - 1)
        samples = len(self.seeds) * len(self.conditions()) * (self.steps - 1)
        if samples <= self.order:
            raise ValueError(
                f"order {self.order} needs more than {self.order} samples; seeds x conditions x (steps - 1) gives "
                f"{samples}: lower order, or add seeds, conditions or steps"
            )
        return self
