"""From a study spec to its cells, validated before any model loads."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pydantic

from cachekit.errors import CachekitError
from cachekit.registry import make_config
from cachekit.schemas import PolicyConfig
from cachekit.schemas.files import SUFFIXES, parse_table
from cachekit.schemas.study import StudySpec

UNCACHED = "uncached"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class StudySpecError(CachekitError, ValueError):
    """A study spec that cannot run; the message names the field."""


@dataclass(frozen=True)
class Setting:
    """One policy setting of a study, or the uncached reference (config None)."""

    key: str  # canonical JSON of the config: the identity of the setting in the results
    label: str  # short, for tables and plots
    config: PolicyConfig | None

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


def load_spec(source: str | Path) -> StudySpec:
    """A spec from a .toml/.json file, or the name of a spec shipped with cachekit ("default")."""
    path = Path(source)
    if path.suffix in SUFFIXES:
        text, suffix = path.read_text(), path.suffix
    else:
        shipped = resources.files("cachekit.schemas").joinpath(f"{source}_study.toml")
        if not shipped.is_file():
            raise StudySpecError(f"{source!r} is neither a .toml/.json study spec nor a shipped spec (default)")
        text, suffix = shipped.read_text(), ".toml"
    try:
        return StudySpec.model_validate(parse_table(text, suffix))
    except ValueError as error:  # invalid TOML, JSON or spec
        raise StudySpecError(f"invalid study spec {source}: {error}") from None


def plan(spec: StudySpec) -> Plan:
    """Every cell of `spec`, after checking each model and policy setting (no model is loaded)."""
    from cachekit import testbed

    for index, model in enumerate(spec.models):
        if model in testbed.names():
            if not spec.labels:
                raise StudySpecError(f"labels: testbed model {model!r} (models[{index}]) generates from class labels")
        elif Path(model).is_dir() or _HUB_ID.match(model):
            if not spec.prompts:
                raise StudySpecError(f"prompts: diffusers pipeline {model!r} (models[{index}]) generates from prompts")
        else:
            raise StudySpecError(
                f"models[{index}]: unknown model {model!r}: not a testbed model ({', '.join(testbed.names())}), "
                "a local pipeline folder, or a hub id like 'org/name'"
            )
    settings = [Setting.uncached()]
    for index, entry in enumerate(spec.policies):
        for values in entry.settings():
            try:
                config = make_config(values)
            except (pydantic.ValidationError, LookupError, TypeError, ValueError) as error:
                raise StudySpecError(f"policies[{index}] ({json.dumps(values)}): {error}") from None
            setting = Setting(_key(config), _label(config, sorted(entry.sweep)), config)
            if setting.key in {s.key for s in settings}:
                raise StudySpecError(f"policies[{index}]: the setting {setting.label} appears twice")
            settings.append(setting)
    cells = [
        Cell(model, setting, seed, condition)
        for model in spec.models
        for seed in spec.seeds
        for condition in _conditions(spec, model)
        for setting in settings
    ]
    return Plan(spec, settings, cells)


def _conditions(spec: StudySpec, model: str) -> list[str]:
    from cachekit import testbed

    return [str(label) for label in spec.labels] if model in testbed.names() else list(spec.prompts)


def _key(config: PolicyConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def _label(config: PolicyConfig, swept: list[str]) -> str:
    values = config.model_dump(mode="json")
    return " ".join([config.strategy, *(f"{name}={values[name]}" for name in swept)])
