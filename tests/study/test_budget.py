"""A budget instead of a knob: tuned once on held-out seeds, saved, then asked for by name."""

from __future__ import annotations

import json

import pytest

import cachekit
from cachekit.budget import BudgetError, save
from cachekit.errors import StepCountError
from cachekit.schemas import CalibrationSpec
from cachekit.study.models import TestbedModel
from cachekit.tune import Tuner, tuned_setting

STEPS = 10


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    model = TestbedModel("flux-digits", CalibrationSpec(model="flux-digits", labels=[5], steps=STEPS))
    base = {"strategy": "uniform"}
    result = Tuner(model, base, seeds=[1000], conditions=["5"]).to_budget(0.4)
    path = save(tmp_path_factory.mktemp("budget") / "flux-digits.json", tuned_setting(model, base, result, 0.4))
    return model, result, path


def test_a_budget_takes_the_tuned_setting_and_spends_what_it_spent_there(tuned):
    model, result, path = tuned
    with cachekit.apply(model.target, {"strategy": "uniform", "budget": 0.4, "tuned": str(path)}) as handle:
        model.generate(7, "3")  # a seed and label the tuning never saw
    assert handle.strategy.config.interval == int(result.chosen.value)
    assert handle.stats.info["budget"].startswith(f"40% tuned at {STEPS} steps: interval={int(result.chosen.value)}")
    computed = handle.stats.last.branches[0].sites["span"].computed
    assert computed / STEPS <= 0.4
    with cachekit.apply(model.target, {"strategy": "uniform", "speedup": 2.5, "tuned": str(path)}) as handle:
        model.generate(7, "3")
    assert handle.strategy.config.interval == int(result.chosen.value)  # a speedup of 2.5 is a budget of 40%


def test_a_budget_without_its_setting_says_which_command_makes_it(tuned):
    model, _, path = tuned
    with pytest.raises(
        BudgetError,
        match=r"needs the setting tuned for it: make it with `cachekit tune <calibration "
        r"spec> --strategy '\{.*\"strategy\": \"uniform\".*\}' --budget 0\.4 --save <file>`",
    ):
        cachekit.apply(model.target, {"strategy": "uniform", "budget": 0.4})
    with pytest.raises(
        BudgetError,
        match=r"has no setting tuned for a budget of 30% with this config .*it holds: "
        r"uniform budget 0\.4 at 10 steps",
    ):
        cachekit.apply(model.target, {"strategy": "uniform", "budget": 0.3, "tuned": str(path)})
    with pytest.raises(BudgetError, match=r"has no setting tuned for a budget of 40% with this config"):
        cachekit.apply(model.target, {"strategy": "uniform", "budget": 0.4, "warmup": 3, "tuned": str(path)})
    with pytest.raises(BudgetError, match=r"give a budget or interval, not both"):
        cachekit.apply(model.target, {"strategy": "uniform", "budget": 0.4, "interval": 2, "tuned": str(path)})


def test_a_budget_tuned_for_another_model_or_step_count_is_refused(tuned):
    model, _, path = tuned
    entry = json.loads(path.read_text())["settings"][0]
    other = path.with_name("other.json")
    other.write_text(json.dumps({"settings": [{**entry, "identity": "flux:0123456789ab"}]}))
    with pytest.raises(BudgetError, match=r"no setting tuned for a budget of 40% .* on model flux:"):
        cachekit.apply(model.target, {"strategy": "uniform", "budget": 0.4, "tuned": str(other)})
    with (
        cachekit.apply(model.target, {"strategy": "uniform", "budget": 0.4, "tuned": str(path)}),
        pytest.raises(
            StepCountError,
            match=r"this generation has 6 steps, but the setting for the strategy's "
            r"budget was tuned at 10",
        ),
    ):
        model.generate(7, "3", steps=6)


def test_budget_fields_are_checked():
    with pytest.raises(cachekit.schemas.checked.ConfigError, match=r"give budget or speedup \(its inverse\), not both"):
        cachekit.make_config({"strategy": "uniform", "budget": 0.2, "speedup": 5})
    with pytest.raises(
        cachekit.schemas.checked.ConfigError, match=r"budget\n  Input should be less than or equal to 1"
    ):
        cachekit.make_config({"strategy": "uniform", "budget": 2})
    with pytest.raises(BudgetError, match=r"strategy 'pab' declares no knob, so it cannot be given a budget"):
        cachekit.apply(cachekit.testing.tiny_flux_transformer(), {"strategy": "pab", "budget": 0.5})
