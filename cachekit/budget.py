"""Budgets: a user asks for a share of the block executions (`budget = 0.2`, or `speedup = 5`)
instead of a strategy's knob. The knob's value comes from a file that `cachekit tune --budget B
--save FILE` wrote: the setting it chose on held-out seeds, for this model (its identity), this
strategy config, this estimator and this step count; anything else is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cachekit.errors import CachekitError
from cachekit.schemas.configs import StrategyConfig

#: Config fields that say how much to spend or keep, not how the strategy decides.
NOT_MATCHED = frozenset({"budget", "speedup", "tuned", "num_inference_steps", "max_kept_bytes"})


class BudgetError(CachekitError, ValueError):
    """A budget that cannot be met, or has no tuned setting for this model, config and step count."""


@dataclass(frozen=True)
class TunedSetting:
    identity: str  # the model's (`Adapter.identity()`)
    config: dict[str, Any]  # the strategy config tuned, but its knob and `NOT_MATCHED`
    steps: int
    budget: float
    knob: str
    value: float | str  # a schedule's mask
    spent: float  # the mean share of block executions it spent on the held-out seeds
    quality: float
    metric: str


def base_of(config: StrategyConfig, knob: str) -> dict[str, Any]:
    """What a tuned setting is matched on: the config but its knob and `NOT_MATCHED`."""
    return config.model_dump(mode="json", exclude={knob, *NOT_MATCHED}, exclude_none=True)


def load(path: str | Path) -> list[TunedSetting]:
    path = Path(path)
    if not path.is_file():
        raise BudgetError(
            f"no tuned settings at {path.resolve()}: make them with `cachekit tune ... --budget B --save {path}`"
        )
    try:
        return [TunedSetting(**entry) for entry in json.loads(path.read_text())["settings"]]
    except (ValueError, KeyError, TypeError) as error:
        raise BudgetError(f"{path} is not a file of tuned settings `cachekit tune --save` writes ({error})") from None


def save(path: str | Path, setting: TunedSetting) -> Path:
    """Add `setting` to the file, replacing one tuned for the same model, config, steps and budget."""
    path = Path(path)
    kept = [s for s in load(path) if _key(s) != _key(setting)] if path.is_file() else []
    path.write_text(json.dumps({"settings": [*map(asdict, kept), asdict(setting)]}, indent=2) + "\n")
    return path


def resolve(config: StrategyConfig, knob: str, identity: str) -> tuple[StrategyConfig, TunedSetting]:
    """`config` with its knob set from the tuned setting for its budget on the model `identity`."""
    budget = config.spending()
    assert budget is not None
    if knob in config.model_fields_set:
        raise BudgetError(f"give a budget or {knob}, not both: the budget sets {knob}")
    base = json.dumps(base_of(config, knob))
    command = f"cachekit tune <calibration spec> --strategy '{base}' --budget {budget:g} --save <file>"
    if config.tuned is None:
        raise BudgetError(
            f"a budget of {budget:.0%} needs the setting tuned for it: make it with `{command}` and give tuned=<file>"
        )
    settings = load(config.tuned)
    found = [
        s
        for s in settings
        if s.identity == identity and s.config == base_of(config, knob) and abs(s.budget - budget) < 1e-9
    ]
    if config.num_inference_steps is not None:
        found = [s for s in found if s.steps == config.num_inference_steps]
    if len(found) != 1:
        held = "; ".join(
            f"{s.config['strategy']} budget {s.budget:g} at {s.steps} steps on {s.identity}" for s in settings
        )
        why = "several step counts: set num_inference_steps" if found else f"it holds: {held or 'nothing'}"
        raise BudgetError(
            f"{config.tuned} has no setting tuned for a budget of {budget:.0%} with this config on model {identity} "
            f"({why}); make it with `{command}`"
        )
    chosen = found[0]
    return config.model_copy(
        update={knob: int(chosen.value) if isinstance(getattr(config, knob), int) else chosen.value}
    ), chosen


def setting_key(identity: str, config: dict[str, Any], steps: int, budget: float) -> tuple[Any, ...]:
    """What tells tuned settings apart: the model, the matched config, the step count, the budget."""
    return identity, json.dumps(config, sort_keys=True), steps, round(budget, 9)


def _key(setting: TunedSetting) -> tuple[Any, ...]:
    return setting_key(setting.identity, setting.config, setting.steps, setting.budget)
