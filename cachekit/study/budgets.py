"""Budget entries of a study: a strategy given `budget` (or `speedup`) and no `tuned` file, or one
of diffusers' methods given `budget`, is tuned for it on the study's calibration cells (its
`calibration_seeds` x its conditions), by the same search `cachekit tune --budget` runs on its
knob, before any of its cells; its cells then run the chosen setting on every seed. The settings
chosen are kept in a file beside the database, so a resumed study does not tune again and the
choice can be read afterwards."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from cachekit.budget import BudgetError, TunedSetting, base_of, load, save, setting_key
from cachekit.schemas.configs import StrategyConfig
from cachekit.schemas.diffusers_methods import DiffusersMethodConfig
from cachekit.schemas.study import StudySpec
from cachekit.strategy import Knob
from cachekit.study.models import StudyModel

Config = StrategyConfig | DiffusersMethodConfig | None


class BudgetWarning(UserWarning):
    """A budget entry of a study that its method cannot meet: its cells are left out."""


def needs_tuning(config: Config) -> bool:
    """A cachekit strategy given a budget without the file tuned for it, or a diffusers method given one."""
    if isinstance(config, StrategyConfig):
        return config.spending() is not None and config.tuned is None
    return config is not None and config.budget is not None


def tuned_file(db: str | Path) -> Path:
    """Where a study keeps the settings it tuned for its budget entries."""
    db = Path(db)
    return db.with_name(f"{db.stem}.tuned.json")


def knob(config: StrategyConfig | DiffusersMethodConfig) -> Knob:
    from cachekit.tune import knob_of

    return knob_of({"strategy": config.strategy})


def without_budget(config: Config, steps: int) -> Config:
    """What checking a budget entry before tuning applies: the method at its knob's default (a
    mask computing all `steps` steps)."""
    if config is None or not needs_tuning(config):
        return config
    fields = config.model_dump(exclude={"budget", "speedup", "tuned"}, exclude_unset=True)
    if knob(config).mask:
        fields[knob(config).field] = "1" * steps
    return type(config).model_validate(fields)


def with_tuned(config: Config, path: Path, model: StudyModel) -> Config:
    """The config a budget entry's cells run on `model`: a strategy's budget with the file tuned for
    it (`cachekit.apply` takes the setting from there); a diffusers method with its knob set."""
    if config is None or not needs_tuning(config):
        return config
    if isinstance(config, StrategyConfig):
        return config.model_copy(update={"tuned": str(path)})
    found = _held(path).get(_key(model, config))
    assert found is not None, "tuned before its cells run"
    field = knob(config)
    return config.model_copy(update={field.field: int(found.value) if field.integer else found.value})


def tune_budgets(model: StudyModel, configs: dict[str, Any], spec: StudySpec, path: Path) -> set[str]:
    """Tune each budget config of `configs` (by setting key) on `model` that `path` does not hold
    yet; one search per method config (a schedule measures its edges once for all its budgets).
    Returns the keys of those whose budget the method cannot meet (warned; their cells are left out)."""
    from cachekit.tune import Tuner, setting_for

    held = _held(path)
    groups: dict[str, dict[str, StrategyConfig | DiffusersMethodConfig]] = {}
    for key, config in configs.items():
        if _key(model, config) not in held:
            groups.setdefault(json.dumps(_base(config), sort_keys=True), {})[key] = config
    unmet = set()
    for base_text, group in groups.items():
        base = json.loads(base_text)
        conditions = spec.generation(model.name).conditions()
        tuner = Tuner(model, base, spec.calibration_seeds, conditions, False, spec.primary)
        for key, config in group.items():
            budget = budget_of(config)
            try:
                result = tuner.to_budget(budget)
            except BudgetError as error:
                warnings.warn(f"{model.name}: {error}; its cells are left out", BudgetWarning, stacklevel=2)
                unmet.add(key)
                continue
            save(path, setting_for(model, base, result, budget))
    return unmet


def _base(config: StrategyConfig | DiffusersMethodConfig) -> dict[str, Any]:
    """What a method's tuned settings are matched on, and what its search starts from."""
    if isinstance(config, StrategyConfig):
        return base_of(config, knob(config).field)
    return config.model_dump(mode="json", exclude={knob(config).field, "budget"})


def budget_of(config: StrategyConfig | DiffusersMethodConfig) -> float:
    """The share a budget entry asks for (a strategy's speedup as its inverse)."""
    budget = config.spending() if isinstance(config, StrategyConfig) else config.budget
    assert budget is not None
    return budget


def _key(model: StudyModel, config: StrategyConfig | DiffusersMethodConfig) -> tuple[Any, ...]:
    return setting_key(model.identity(), _base(config), model.spec.steps, budget_of(config))


def _held(path: Path) -> dict[tuple[Any, ...], TunedSetting]:
    settings = load(path) if path.is_file() else []
    return {setting_key(s.identity, s.config, s.steps, s.budget): s for s in settings}
