"""Budget entries of a study: tuned on the calibration cells only, by the search `cachekit tune`
runs, then scored on every seed with the setting chosen; kept beside the database for a resume."""

from __future__ import annotations

import json
import re
import warnings

import pytest

from cachekit.budget import load
from cachekit.study import load_spec, run_study
from cachekit.study.budgets import BudgetWarning
from cachekit.study.models import TestbedModel
from cachekit.study.plan import StudySpecError, plan
from cachekit.study.runner import ResultStore
from cachekit.tune import Tuner

STEPS = 8
STUDY = f"""name = "b"
models = ["flux-digits"]
labels = [5]
seeds = [0]
calibration_seeds = [1000]
steps = {STEPS}
repeats = 1
warmup = 0

[[strategies]]
strategy = "uniform"
sweep.budget = [0.3, 0.5]

[[strategies]]
strategy = "schedule"
budget = 0.4

[[strategies]]
strategy = "diffusers.first_block_cache"
budget = 0.5

# computes its first three steps: 10% of 8 steps is out of its reach
[[strategies]]
strategy = "diffusers.taylorseer_cache"
budget = 0.1
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("budgets")
    (folder / "spec.toml").write_text(STUDY)
    seen: list[list[int]] = []
    original = Tuner.__init__

    def spying(self, model, base, seeds, conditions, *args, **kwargs):
        seen.append(list(seeds))
        original(self, model, base, seeds, conditions, *args, **kwargs)

    Tuner.__init__ = spying
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            db = run_study(load_spec(folder / "spec.toml"), folder / "r.sqlite", progress=False)
    finally:
        Tuner.__init__ = original
    return db, seen, [w for w in warned if issubclass(w.category, BudgetWarning)]


def test_budget_entries_are_tuned_on_calibration_seeds_only_and_spend_within_budget(study):
    db, seen, _ = study
    assert seen == [[1000]] * 4  # one search per method config, on the calibration seed alone
    tuned = {(s.config["strategy"], s.budget): s for s in load(db.with_name("r.tuned.json"))}
    assert sorted(tuned) == [
        ("diffusers.first_block_cache", 0.5),
        ("schedule", 0.4),
        ("uniform", 0.3),
        ("uniform", 0.5),
    ]
    model = TestbedModel("flux-digits", load_spec(db.with_name("spec.toml")).generation("flux-digits"))
    independent = Tuner(model, {"strategy": "uniform"}, seeds=[1000], conditions=["5"]).to_budget(0.3)
    assert tuned[("uniform", 0.3)].value == independent.chosen.value
    rows = [r for r in ResultStore(db).rows("b") if r["setting"] != "uncached"]
    assert len(rows) == 8  # 4 settings x (seed 0 + calibration seed 1000)
    for r in rows:
        config = json.loads(r["setting"])
        assert config.get("tuned") is None  # the setting is the entry as written; the file is the study's
        assert r["block_share"] <= config["budget"] + 1e-9
    fbc = tuned[("diffusers.first_block_cache", 0.5)]
    assert fbc.knob == "threshold" and fbc.spent <= 0.5


def test_a_budget_a_method_cannot_meet_is_warned_and_its_cells_left_out(study):
    db, _, warned = study
    assert len(warned) == 1
    assert re.search(
        r"flux-digits: diffusers.taylorseer_cache cannot spend as little as 10\.0% .* give a budget of at least "
        r"[\d.]+%; its cells are left out",
        str(warned[0].message),
    )
    assert not [r for r in ResultStore(db).rows("b") if r["strategy"] == "diffusers.taylorseer_cache"]


def test_a_resumed_study_does_not_tune_again(study, monkeypatch):
    db, _, _ = study

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuned again")

    monkeypatch.setattr(Tuner, "__init__", no_tuning)
    spec = load_spec(db.with_name("spec.toml"))
    spec = spec.model_copy(update={"strategies": spec.strategies[:-1]})  # the unmet budget would be tried again
    run_study(spec, db, progress=False)  # every cell done: nothing runs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("calibration_seeds = [1000]\n", ""),
            r"strategies\[0\]: a budget \(30%\) is tuned on calibration cells: give the study calibration_seeds",
        ),
        (
            ('strategy = "schedule"\n', 'strategy = "pab"\n'),
            r"strategies\[1\]: strategy 'pab' declares no knob to tune for a budget",
        ),
    ],
)
def test_budget_entries_that_cannot_be_tuned_are_named_before_anything_runs(tmp_path, change, message):
    (tmp_path / "spec.toml").write_text(STUDY.replace(*change))
    with pytest.raises(StudySpecError, match=message):
        plan(load_spec(tmp_path / "spec.toml"))
