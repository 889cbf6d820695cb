"""Study specs: a grid of (model, strategy setting, seed, prompt) cells compared under one protocol.

A strategy entry is a config dict (with its ``strategy``) plus an optional ``sweep`` table whose
lists expand into one setting per combination; the uncached reference is always part of a study.

    models = ["flux-digits"]
    labels = [3, 7]
    seeds = [0, 1]

    [[strategies]]
    strategy = "teacache"
    coefficients = [1.0, 0.0]
    sweep.rel_l1_thresh = [0.05, 0.1, 0.2]
"""

from __future__ import annotations

import itertools
import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from cachekit.schemas.checked import Checked
from cachekit.schemas.configs import Share


class StrategyEntry(Checked):
    """One strategy of a study (a cachekit strategy, or a diffusers method as ``diffusers.<name>``),
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
    def _swept_fields_are_not_also_fixed(self) -> StrategyEntry:
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


class ContextParallel(Checked):
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


#: Where a model runs: "cpu", "cuda" (the current device) or "cuda:N".
Device = Annotated[str, Field(pattern=r"^(cpu|cuda(:\d+)?)$")]


class PipelineSettings(Checked):
    """How a model is called: set for every model of a study at the top level, or per model.

    `height`, `width` and `frames` set at the top level apply to the models whose pipeline takes
    them (an image model ignores `frames`); every other argument, and any set per model, must be
    one the model's pipeline takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    guidance_scale: float | None = Field(default=None, gt=0, description="Unset: the pipeline's default.")
    height: int | None = Field(default=None, ge=8, description="Diffusers pipelines only.")
    width: int | None = Field(default=None, ge=8, description="Diffusers pipelines only.")
    frames: int | None = Field(default=None, ge=1, description="Diffusers video pipelines only (num_frames).")
    negative_prompt: str | None = Field(default=None, description="Diffusers pipelines only.")
    true_cfg_scale: float | None = Field(
        default=None, gt=0, description="True CFG (Flux, Qwen-Image): > 1 with a negative_prompt runs it."
    )
    image: str | None = Field(
        default=None, description="An input image file (image-to-video), relative to the spec file."
    )
    pipeline_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further arguments of the pipeline's call (max_sequence_length, ...)."
    )
    device: Device = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    offload: Literal["none", "model", "sequential"] = Field(
        default="none",
        description="diffusers' CPU offload on a CUDA device: whole models ('model') or every layer ('sequential').",
    )
    fps: int = Field(default=8, ge=1, le=240, description="Frame rate of the MP4 files videos are saved as.")

    @model_validator(mode="after")
    def _offload_on_cuda(self) -> PipelineSettings:
        if self.offload != "none" and not self.device.startswith("cuda"):
            raise ValueError(f"offload={self.offload!r} moves models to a CUDA device and back: set device = 'cuda'")
        return self


class ModelEntry(PipelineSettings):
    """A model of a study and the settings it alone takes; fields left unset take the study's."""

    name: str = Field(min_length=1, description="A testbed name, or a diffusers pipeline id / local folder.")

    def overrides(self) -> dict[str, Any]:
        """The settings given for this model."""
        return {field: getattr(self, field) for field in self.model_fields_set - {"name"}}


class Generation(PipelineSettings):
    """How a model generates in a study or a calibration: seeds, conditions, steps, and how it is called."""

    seeds: list[int] = Field(default=[0], min_length=1)
    labels: list[int] = Field(default_factory=list, description="Class labels, for testbed models.")
    prompts: list[str] = Field(default_factory=list, description="Prompts, for diffusers pipelines.")
    steps: int = Field(default=50, ge=2, le=1000)
    context_parallel: ContextParallel | None = Field(
        default=None, description="Split each generation over processes (run under torchrun)."
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads torch computes with. Unset: 1 where every model is a testbed model (they are "
        "tiny: more threads only contend, 10-25x slower on a busy 2-core machine), else torch's default.",
    )

    def conditions(self) -> list[str]:
        """What one generation is conditioned on: the labels (as text), else the prompts."""
        return [str(label) for label in self.labels] or list(self.prompts)

    @model_validator(mode="after")
    def _something_to_generate(self) -> Generation:
        if not self.labels and not self.prompts:
            raise ValueError("give labels (testbed models) or prompts (diffusers pipelines)")
        for field in ("seeds", "labels", "prompts"):
            values = getattr(self, field)
            if len(set(values)) != len(values):
                raise ValueError(f"{field} repeats a value: {values}")
        return self


#: A quality metric of a study: its name, or a table with its name and options.
MetricEntry = str | dict[str, Any]


class StudySpec(Generation):
    """What to compare and how: every model x strategy setting x seed x prompt (or label)."""

    name: str = Field(default="study", min_length=1)
    models: list[ModelEntry] = Field(
        min_length=1, description="Testbed names, diffusers pipeline ids or folders; or tables with per-model settings."
    )
    strategies: list[StrategyEntry] = Field(min_length=1)
    repeats: int = Field(default=3, ge=1, le=100, description="Timed generations per cell (median reported).")
    warmup: int = Field(default=1, ge=0, le=10, description="Untimed generations before timing.")
    primary: str = Field(
        default="psnr",
        min_length=1,
        description="The metric the report ranks methods by and compares budgets with: any installed metric that "
        "compares with the uncached output (its direction, higher or lower better, is the metric's own).",
    )
    metrics: list[MetricEntry] | None = Field(
        default=None,
        description="Quality metrics besides the primary one (always computed): names, or tables "
        "{name = ..., options}. Unset: every installed metric that can run on this machine.",
    )
    calibration_seeds: list[int] = Field(
        default_factory=list,
        description="Seeds whose cells choose each method's setting at each budget of the report, which then "
        "scores that choice on `seeds` alone (held out). Unset: settings are chosen on the cells they are scored on.",
    )
    budgets: list[Share] = Field(
        default=[0.2, 0.3, 0.4, 0.5],
        min_length=1,
        description="The shares of block executions the report compares methods within (its winner per budget).",
    )
    save_tensors: bool = Field(
        default=True,
        description="Keep every cell's output as a safetensors file beside its PNG/MP4 (the uncached references' "
        "are always kept).",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _names_as_entries(cls, models: Any) -> Any:
        if isinstance(models, list):
            return [{"name": model} if isinstance(model, str) else model for model in models]
        return models

    @model_validator(mode="after")
    def _calibration_apart(self) -> StudySpec:
        shared = sorted(set(self.seeds) & set(self.calibration_seeds))
        if shared:
            raise ValueError(
                f"seeds {shared} are both scored and calibration seeds: a setting chosen on a seed cannot be "
                "scored on it; give calibration_seeds of their own"
            )
        if len(set(self.calibration_seeds)) != len(self.calibration_seeds):
            raise ValueError(f"calibration_seeds repeats a value: {self.calibration_seeds}")
        return self

    @model_validator(mode="after")
    def _models_once(self) -> StudySpec:
        names = [model.name for model in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models repeats a value: {names}")
        return self

    def model(self, name: str) -> ModelEntry:
        return next(model for model in self.models if model.name == name)

    def generation(self, name: str) -> Generation:
        """The settings model `name` generates with: the study's, overridden by its own."""
        overrides = self.model(name).overrides()
        kwargs = {**self.pipeline_kwargs, **overrides.pop("pipeline_kwargs", {})}
        values = self.model_dump(include=set(Generation.model_fields))
        return Generation.model_validate({**values, **overrides, "pipeline_kwargs": kwargs})
