"""From a study spec to its cells, validated before any model loads."""

from __future__ import annotations

import difflib
import json
import re
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pydantic
import torch

from cachekit.errors import CachekitError
from cachekit.metric import MetricError
from cachekit.registry import make_config
from cachekit.schemas.configs import StrategyConfig
from cachekit.schemas.diffusers_methods import DIFFUSERS_METHODS, DiffusersMethodConfig
from cachekit.schemas.estimators import EstimatorConfig
from cachekit.schemas.files import SUFFIXES, parse_table, read_table
from cachekit.schemas.study import Generation, StrategyEntry, StudySpec
from cachekit.study.metrics import Metrics, metrics_for
from cachekit.study.models import CallSignature, PipelineArgumentError, call_arguments, model_index, pipeline_class
from cachekit.study.store import UNCACHED

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class StudySpecError(CachekitError, ValueError):
    """A study spec that cannot run; the message names the field."""


@dataclass(frozen=True)
class Setting:
    """One strategy setting of a study, or the uncached reference (config None)."""

    key: str  # canonical JSON of the config: the identity of the setting in the results
    label: str  # short, for tables and plots: the method and the swept values
    config: StrategyConfig | DiffusersMethodConfig | None  # a cachekit strategy, or a diffusers method
    method: str = UNCACHED  # the strategy entry it comes from, for tables per method

    @classmethod
    def uncached(cls) -> Setting:
        return cls(UNCACHED, UNCACHED, None)


@dataclass(frozen=True)
class Cell:
    model: str
    setting: Setting
    seed: int
    condition: str  # the class label (testbed) or the prompt (diffusers)


@dataclass(frozen=True)
class Plan:
    spec: StudySpec
    settings: list[Setting]  # the uncached reference first
    cells: list[Cell]
    metrics: Metrics  # what every cell is scored with


def load_spec(source: str | Path) -> StudySpec:
    """A spec from a .toml/.json file, or the name of a spec shipped with cachekit ("default");
    input image paths are taken relative to the spec file."""
    path = Path(source)
    try:
        if path.suffix in SUFFIXES:
            data = with_paths_from(read_table(path), path.parent)
        else:
            shipped = resources.files("cachekit.schemas").joinpath(f"{source}_study.toml")
            if not shipped.is_file():
                raise StudySpecError(f"{source!r} is neither a .toml/.json study spec nor a shipped spec (default)")
            data = parse_table(shipped.read_text(), ".toml")
        return StudySpec.model_validate(data)
    except StudySpecError:
        raise
    except ValueError as error:  # unreadable, invalid TOML or JSON, or an invalid spec
        raise StudySpecError(f"invalid study spec {source}: {error}") from None


def with_paths_from(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`data` (a spec's table) with its relative `image` paths made relative to `folder`."""

    def resolved(table: Any) -> Any:
        if isinstance(table, dict) and isinstance(table.get("image"), str):
            return {**table, "image": str(folder / table["image"])}
        return table

    data = resolved(data)
    if isinstance(data.get("models"), list):
        data["models"] = [resolved(model) for model in data["models"]]
    return data


def plan(spec: StudySpec) -> Plan:
    """Every cell of `spec`, after checking each model, its call arguments, the metrics and every
    strategy setting (no model is loaded)."""
    for index, model in enumerate(spec.models):
        check_model(model.name, spec.generation(model.name), f"models[{index}]", frozenset(model.overrides()))
    metrics = check_metrics(spec)
    settings = [Setting.uncached()]
    methods: set[str] = set()
    for index, entry in enumerate(spec.strategies):
        method = None
        for values in entry.settings():
            try:
                config = _config(values, spec)
            except (pydantic.ValidationError, LookupError, TypeError, ValueError) as error:
                raise StudySpecError(f"strategies[{index}] ({json.dumps(values)}): {error}") from None
            _check_budget(config, spec, index)
            method = method or _method(entry, config, index, methods)
            setting = Setting(_key(config), _label(method, config, sorted(entry.sweep)), config, method)
            if setting.key in {s.key for s in settings}:
                raise StudySpecError(f"strategies[{index}]: the setting {setting.label} appears twice")
            settings.append(setting)
        methods.add(str(method))
    cells = [
        Cell(model.name, setting, seed, condition)
        for model in spec.models
        for seed in [*spec.seeds, *spec.calibration_seeds]
        for condition in _conditions(spec, model.name)
        for setting in settings
    ]
    return Plan(spec, settings, cells, metrics)


def _check_budget(config: StrategyConfig | DiffusersMethodConfig, spec: StudySpec, index: int) -> None:
    """A budget entry is tuned on calibration cells, by its method's knob: both must be there."""
    from cachekit.study.budgets import budget_of, needs_tuning

    if not needs_tuning(config):
        return
    if isinstance(config, StrategyConfig):
        from cachekit.registry import get_strategy

        if get_strategy(config.strategy).knob is None:
            raise StudySpecError(
                f"strategies[{index}]: strategy {config.strategy!r} declares no knob to tune for a budget"
            )
    if not spec.calibration_seeds:
        raise StudySpecError(
            f"strategies[{index}]: a budget ({budget_of(config):.0%}) is tuned on calibration cells: give the study "
            "calibration_seeds (apart from its seeds)"
            + (", or the file tuned for it (tuned = FILE)" if isinstance(config, StrategyConfig) else "")
        )


def check_model(model: str, spec: Generation, where: str, own: frozenset[str] = frozenset()) -> None:
    """A testbed name (with labels), a local pipeline folder or a hub id (with prompts); a name
    close to a testbed model's is taken for a typo, not sent to the hub. The call arguments are
    checked against the pipeline's where its class can be known without loading it."""
    from cachekit import testbed
    from cachekit.testbed.models import CLASSES

    close = difflib.get_close_matches(model, testbed.names(), n=1, cutoff=0.75)
    if model in testbed.names():
        if not spec.labels:
            raise StudySpecError(f"labels: testbed model {model!r} ({where}) generates from class labels")
        if not all(0 <= label < CLASSES for label in spec.labels):
            raise StudySpecError(
                f"labels {spec.labels}: testbed model {model!r} ({where}) generates the digits 0 to {CLASSES - 1}"
            )
    elif close:
        raise StudySpecError(f"{where}: unknown model {model!r}; did you mean the testbed model {close[0]!r}?")
    elif Path(model).is_dir() or _HUB_ID.match(model):
        if not spec.prompts:
            raise StudySpecError(f"prompts: diffusers pipeline {model!r} ({where}) generates from prompts")
        if Path(model).is_dir() and not (Path(model) / "model_index.json").is_file():
            raise StudySpecError(f"{where}: {model!r} is a folder without model_index.json, not a diffusers pipeline")
        components = model_index(model)
        if components is not None and "transformer" not in components:
            held = ", ".join(sorted(name for name in components if not name.startswith("_")))
            raise StudySpecError(
                f"{where}: {model!r} is a {components.get('_class_name', 'pipeline')} without a transformer (it holds "
                f"{held}): cachekit caches diffusion transformers (DiT pipelines: Flux, Wan, SD3, ...), not UNets"
            )
    else:
        raise StudySpecError(
            f"{where}: unknown model {model!r}: not a testbed model ({', '.join(testbed.names())}), "
            "a local pipeline folder, or a hub id like 'org/name'"
        )
    if (
        (spec.true_cfg_scale or 0) > 1
        and spec.negative_prompt is None
        and "negative_prompt" not in spec.pipeline_kwargs
    ):
        warnings.warn(
            f"{where} ({model}): true_cfg_scale = {spec.true_cfg_scale} without a negative_prompt: diffusers runs "
            "true CFG only with a negative prompt, so these generations run without it; set negative_prompt "
            '(even "" runs it)',
            StudyWarning,
            stacklevel=2,
        )
    pipeline = pipeline_class(model)
    if pipeline is not None:
        try:
            call_arguments(spec, CallSignature.of(pipeline), own, f"{where} ({model})")
        except PipelineArgumentError as error:
            raise StudySpecError(str(error)) from None


class StudyWarning(UserWarning):
    """A study that will run, but not as its spec seems to ask."""


def check_device(device: str) -> None:
    """A CUDA device must be there: found before a database is made or a model loaded."""
    if not device.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise StudySpecError(
            f"device {device!r}: torch sees no CUDA device on this machine (torch {torch.__version__}, {build}); "
            "set device = 'cpu', or run where a GPU is"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise StudySpecError(f"device {device!r}: this machine has {count} CUDA devices (cuda:0 to cuda:{count - 1})")


def check_metrics(spec: StudySpec) -> Metrics:
    """The metrics of the spec, each installed and able to run on this machine."""
    try:
        return metrics_for(spec.metrics, spec.primary)
    except MetricError as error:
        raise StudySpecError(f"metrics: {error}") from None


def _conditions(spec: StudySpec, model: str) -> list[str]:
    from cachekit import testbed

    return [str(label) for label in spec.labels] if model in testbed.names() else list(spec.prompts)


def _config(values: dict[str, object], spec: StudySpec) -> StrategyConfig | DiffusersMethodConfig:
    """A cachekit strategy config, or a diffusers method's (which gets the study's step count)."""
    strategy = str(values["strategy"])
    if not strategy.startswith("diffusers."):
        return make_config(values)
    if strategy not in DIFFUSERS_METHODS:
        raise LookupError(f"unknown diffusers method {strategy!r}; known: {', '.join(sorted(DIFFUSERS_METHODS))}")
    peer = DIFFUSERS_METHODS[strategy]
    if "num_inference_steps" in peer.model_fields and values.get("num_inference_steps") is None:
        values = {**values, "num_inference_steps": spec.steps}
    return peer.model_validate(values)


def _method(entry: StrategyEntry, config: StrategyConfig | DiffusersMethodConfig, index: int, taken: set[str]) -> str:
    """The entry's name, else the strategy and the estimator where it is not the strategy's own;
    made unique with the entry's index where two entries would share it."""
    if entry.name is not None:
        if entry.name in taken:
            raise StudySpecError(f"strategies[{index}]: the name {entry.name!r} is already taken")
        return entry.name
    method = config.strategy
    if isinstance(config, StrategyConfig):
        default = type(config).model_fields["estimator"].default
        if config.estimator != default:
            method += "+" + estimator_label(config.estimator)
    return method if method not in taken else f"{method} #{index + 1}"


def estimator_label(estimator: EstimatorConfig) -> str:
    """copy, taylor2 (a second-order forecast over timesteps), taylor1@step, foca, ..."""
    fields = estimator.model_dump()
    if estimator.kind != "taylor":
        return estimator.kind
    return f"taylor{fields['order']}" + ("@step" if fields["spacing"] == "step" else "")


def _key(config: StrategyConfig | DiffusersMethodConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def _label(method: str, config: StrategyConfig | DiffusersMethodConfig, swept: list[str]) -> str:
    values = config.model_dump(mode="json")
    shown = [f"{name}={values[name] if name != 'estimator' else estimator_label(config.estimator)}" for name in swept]  # type: ignore[union-attr]
    return " ".join([method, *shown])
