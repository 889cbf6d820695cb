"""The schedule strategy's config: a per-step mask, searched for a budget or given."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cachekit.errors import shortened
from cachekit.schemas.configs import StrategyConfig


class ScheduleConfig(StrategyConfig):
    """Compute the steps `mask` marks "1", produce the span's residual with the estimator on the
    steps it marks "0". The mask is searched for a budget on calibration prompts, with the
    estimator in the loop (`cachekit tune SPEC --strategy schedule --budget B --save FILE`, then
    `{"strategy": "schedule", "budget": B, "tuned": FILE}`), or given."""

    strategy: Literal["schedule"] = "schedule"
    mask: str | None = Field(
        default=None,
        description='One character per step: "1" computes it, "0" reuses; the first step is always computed.',
    )
    resample: bool = Field(
        default=False,
        description="Stretch the mask by nearest index to a generation of another length (off: refused).",
    )

    @field_validator("mask")
    @classmethod
    def _zeros_and_ones(cls, mask: str | None) -> str | None:
        if mask is not None and (not mask.startswith("1") or set(mask) - {"0", "1"}):
            raise ValueError(
                '"1" (compute) or "0" (reuse) per step, the first "1" (nothing is cached before it), e.g. "1101"; '
                f"got {shortened(mask, 60)!r}"
            )
        return mask

    @model_validator(mode="after")
    def _mask_or_budget(self) -> ScheduleConfig:
        if self.mask is None and self.spending() is None:
            raise ValueError(
                'give the mask (e.g. mask="1101...", one character per step) or a budget with the file tuned for it '
                "(`cachekit tune SPEC --strategy schedule --budget B --save FILE`, then budget=B, tuned=FILE)"
            )
        return self

    def mask_at(self, steps: int) -> tuple[bool, ...] | None:
        """The mask for a generation of `steps` steps: as given, stretched where `resample`, or None."""
        assert self.mask is not None
        if len(self.mask) == steps:
            return tuple(c == "1" for c in self.mask)
        if not self.resample:
            return None
        return tuple(self.mask[index * len(self.mask) // steps] == "1" for index in range(steps))
