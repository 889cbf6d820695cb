"""Study specs: a grid of (model, policy setting, seed, prompt) cells compared under one protocol.

A policy entry is a config dict (with its ``strategy``) plus an optional ``sweep`` table whose
lists expand into one setting per combination; the uncached reference is always part of a study.

    models = ["flux-digits"]
    labels = [3, 7]
    seeds = [0, 1]

    [[policies]]
    strategy = "teacache"
    coefficients = [1.0, 0.0]
    sweep.rel_l1_thresh = [0.05, 0.1, 0.2]
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class PolicyEntry(BaseModel):
    """One policy of a study (a cachekit strategy, or a diffusers method as ``diffusers.<name>``),
    with the fields it sweeps; `name` names the method in reports (default: the strategy, and
    the estimator where it is not the strategy's own)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    strategy: str = Field(min_length=1)
    name: str | None = Field(default=None, min_length=1)
    sweep: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("sweep")
    @classmethod
    def _non_empty_lists(cls, sweep: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for field, values in sweep.items():
            if not values:
                raise ValueError(f"sweep.{field} is empty: give at least one value")
            if len({json.dumps(value, sort_keys=True) for value in values}) != len(values):
                raise ValueError(f"sweep.{field} repeats a value: {values}")
        return sweep

    @model_validator(mode="after")
    def _swept_fields_are_not_also_fixed(self) -> PolicyEntry:
        repeated = sorted(set(self.sweep) & {"strategy", *self.fixed()})
        if repeated:
            raise ValueError(f"fields {repeated} are both swept and set directly")
        return self

    def fixed(self) -> dict[str, Any]:
        """The fields every setting shares (all but the sweep)."""
        return dict(self.model_extra or {})

    def settings(self) -> list[dict[str, Any]]:
        """One config dict per combination of the swept values."""
        names = sorted(self.sweep)
        return [
            {"strategy": self.strategy, **self.fixed(), **dict(zip(names, values, strict=True))}
            for values in itertools.product(*(self.sweep[name] for name in names))
        ]


class ContextParallel(BaseModel):
    """Split each generation's sequence over `ulysses` x `ring` processes with diffusers' context
    parallelism (for models too big or too slow for one GPU); the processes of a `torchrun` launch
    form (data x context) groups: each context group generates its share of the cells together."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ulysses: int = Field(default=1, ge=1, description="Ulysses degree (heads exchanged all-to-all).")
    ring: int = Field(default=1, ge=1, description="Ring degree (keys and values passed around).")

    @property
    def degree(self) -> int:
        return self.ulysses * self.ring

    @model_validator(mode="after")
    def _splits_something(self) -> ContextParallel:
        if self.degree < 2:
            raise ValueError("give ulysses or ring greater than 1 (leave context_parallel unset for none)")
        return self


class Generation(BaseModel):
    """How a model generates in a study or a calibration: seeds, conditions, steps, device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seeds: list[int] = Field(default=[0], min_length=1)
    labels: list[int] = Field(default_factory=list, description="Class labels, for testbed models.")
    prompts: list[str] = Field(default_factory=list, description="Prompts, for diffusers pipelines.")
    steps: int = Field(default=50, ge=2, le=1000)
    guidance_scale: float | None = Field(default=None, gt=0, description="Unset: the model's default.")
    height: int | None = Field(default=None, ge=8, description="Diffusers pipelines only.")
    width: int | None = Field(default=None, ge=8, description="Diffusers pipelines only.")
    frames: int | None = Field(default=None, ge=1, description="Diffusers video pipelines only.")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    context_parallel: ContextParallel | None = Field(
        default=None, description="Split each generation over processes (run under torchrun)."
    )

    def conditions(self) -> list[str]:
        """What one generation is conditioned on: the labels (as text), else the prompts."""
        return [str(label) for label in self.labels] or list(self.prompts)

    @model_validator(mode="after")
    def _something_to_generate(self) -> Generation:
        if not self.labels and not self.prompts:
            raise ValueError("give labels (testbed models) or prompts (diffusers pipelines)")
        for field in ("models", "seeds", "labels", "prompts"):
            values = getattr(self, field, [])
            if len(set(values)) != len(values):
                raise ValueError(f"{field} repeats a value: {values}")
        return self


class StudySpec(Generation):
    """What to compare and how: every model x policy setting x seed x prompt (or label)."""

    name: str = Field(default="study", min_length=1)
    models: list[str] = Field(min_length=1, description="Testbed names, or diffusers pipeline ids / local paths.")
    policies: list[PolicyEntry] = Field(min_length=1)
    repeats: int = Field(default=3, ge=1, le=100, description="Timed generations per cell (median reported).")
    warmup: int = Field(default=1, ge=0, le=10, description="Untimed generations before timing.")
