"""Budget entries of a study: a strategy given `budget` (or `speedup`) and no `tuned` file is
tuned for it on the study's calibration cells (its `calibration_seeds` x its conditions), by the
same search `cachekit tune --budget` runs, before any of its cells; its cells then run the chosen
setting on every seed. The settings chosen are kept in a file beside the database, so a resumed
study does not tune again and the choice can be read afterwards."""

from __future__ import annotations

import json
from pathlib import Path

from cachekit.budget import base_of, load, save
from cachekit.registry import get_strategy
from cachekit.schemas.configs import StrategyConfig
from cachekit.schemas.diffusers_methods import DiffusersMethodConfig
from cachekit.schemas.study import StudySpec
from cachekit.study.models import StudyModel

Config = StrategyConfig | DiffusersMethodConfig | None


def needs_tuning(config: Config) -> bool:
    """A cachekit strategy given a budget without the file tuned for it."""
    return isinstance(config, StrategyConfig) and config.spending() is not None and config.tuned is None


def tuned_file(db: str | Path) -> Path:
    """Where a study keeps the settings it tuned for its budget entries."""
    db = Path(db)
    return db.with_name(f"{db.stem}.tuned.json")


def with_tuned(config: Config, path: Path) -> Config:
    """The config a budget entry's cells run: its budget, with the file tuned for it."""
    return config.model_copy(update={"tuned": str(path)}) if needs_tuning(config) else config  # type: ignore[union-attr]


def without_budget(config: Config, steps: int) -> Config:
    """What checking a budget entry before tuning applies: the strategy at its knob's default (a
    mask computing all `steps` steps)."""
    if not needs_tuning(config):
        return config
    assert isinstance(config, StrategyConfig)
    fields = config.model_dump(exclude={"budget", "speedup", "tuned"}, exclude_unset=True)
    knob = get_strategy(config.strategy).knob
    if knob is not None and knob.mask:
        fields[knob.field] = "1" * steps
    return type(config).model_validate(fields)


def tune_budgets(model: StudyModel, configs: list[StrategyConfig], spec: StudySpec, path: Path) -> None:
    """Tune every budget config of `configs` on `model` not yet in `path`; one search per
    strategy config (so a schedule measures its edges once for all its budgets)."""
    from cachekit.tune import Tuner, tuned_setting

    held = {(s.identity, json.dumps(s.config, sort_keys=True), s.steps, round(s.budget, 9)) for s in _settings(path)}
    identity = _identity(model)
    groups: dict[str, list[StrategyConfig]] = {}
    for config in configs:
        knob = get_strategy(config.strategy).knob
        assert knob is not None
        base = base_of(config, knob.field)
        spending = round(config.spending() or 0.0, 9)
        if (identity, json.dumps(base, sort_keys=True), model.spec.steps, spending) not in held:
            groups.setdefault(json.dumps(base, sort_keys=True), []).append(config)
    for key, group in groups.items():
        base = json.loads(key)
        tuner = Tuner(
            model, base, spec.calibration_seeds, spec.generation(model.name).conditions(), False, spec.primary
        )
        for config in group:
            budget = config.spending()
            assert budget is not None
            save(path, tuned_setting(model, base, tuner.to_budget(budget), budget))


def _settings(path: Path) -> list:
    return load(path) if path.is_file() else []


def _identity(model: StudyModel) -> str:
    from cachekit.registry import resolve_adapter

    transformer = model.transformer
    return resolve_adapter(transformer)(transformer).identity()
