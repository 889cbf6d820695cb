"""Held-out selection: a method's setting at a budget is chosen on calibration seeds and scored on
the others; what the evaluation cells hold never changes the choice."""

from __future__ import annotations

import re

import pytest
from helpers import cell_row

from cachekit.study import load_spec, plan
from cachekit.study.plan import StudySpecError
from cachekit.study.report import budget_tables, summarize


def row(setting: str, seed: int, psnr: float, share: float, method: str = "m") -> dict:
    label = "uncached" if setting == "uncached" else f"{method} {setting}"
    return cell_row(setting, seed, psnr, share, method, label)


def cells(seeds: list[int], a: float, b: float) -> list[dict]:
    """Two settings of method m within 40%: `a` scores `a` dB, `b` scores `b` dB."""
    out = []
    for seed in seeds:
        out += [
            row("uncached", seed, 0, 1.0),
            row("a", seed, a + seed * 0.01, 0.3),
            row("b", seed, b + seed * 0.01, 0.35),
        ]
        out += [row("x", seed, 30.0 + seed * 0.01, 0.3, method="n")]
    return out


def chosen_setting(table: str) -> str:
    found = re.search(r"\| m \| (?:\*\*)?(\d+\.\d+)", table)
    assert found, table
    return found.group(1)


def test_the_setting_is_chosen_on_calibration_cells_and_poisoned_evaluation_cells_do_not_move_it():
    calibration = summarize(cells([100, 101, 102], a=40.0, b=35.0))  # a wins where settings are chosen
    honest = summarize(cells([0, 1, 2], a=38.0, b=36.0))
    poisoned = summarize(cells([0, 1, 2], a=38.0, b=90.0))  # b looks far better on the scored cells
    for scored in (honest, poisoned):
        table = "\n".join(budget_tables(scored, budgets=(0.4,), chosen_on=calibration))
        assert "chosen on calibration seeds, scored on held-out seeds" in table
        assert chosen_setting(table) == "38.01"  # setting a, with its held-out mean
    in_sample = "\n".join(budget_tables(poisoned, budgets=(0.4,)))
    assert chosen_setting(in_sample) == "90.01"  # chosen where it is scored, the poison would win


def test_a_chosen_setting_that_overspends_held_out_says_so():
    calibration = summarize(cells([100, 101], a=40.0, b=35.0))
    scored = [
        dict(r, block_share=0.45, block_executions=27) if r["setting"] == "a" else r for r in cells([0, 1], 38, 36)
    ]
    table = "\n".join(budget_tables(summarize(scored), budgets=(0.4,), chosen_on=calibration))
    assert re.search(r"\| m \| \S+ \[[\d., ]+\] \(spent 45\.0%\)", table), table


def test_calibration_seeds_are_run_and_must_be_apart_from_the_scored_ones(tmp_path):
    spec = 'models = ["flux-digits"]\nlabels = [1]\nseeds = [0, 1]\nsteps = 4\n[[strategies]]\nstrategy = "uniform"\n'
    (tmp_path / "s.toml").write_text("calibration_seeds = [7]\n" + spec)
    assert sorted({cell.seed for cell in plan(load_spec(tmp_path / "s.toml")).cells}) == [0, 1, 7]
    (tmp_path / "s.toml").write_text("calibration_seeds = [1, 7]\n" + spec)
    with pytest.raises(StudySpecError, match=r"seeds \[1\] are both scored and calibration seeds"):
        load_spec(tmp_path / "s.toml")


def test_a_study_with_calibration_seeds_reports_held_out_figures(tmp_path):
    from cachekit.study import run_study, write_report
    from cachekit.study.store import ResultStore

    spec = tmp_path / "s.toml"
    spec.write_text(
        'name = "h"\nmodels = ["flux-digits"]\nlabels = [1, 4]\nseeds = [0]\ncalibration_seeds = [9]\nsteps = 6\n'
        'repeats = 1\nwarmup = 0\nmetrics = []\n[[strategies]]\nstrategy = "uniform"\nsweep.interval = [2, 3]\n'
    )
    db = run_study(load_spec(spec), tmp_path / "r.sqlite", progress=False)
    assert {row["seed"] for row in ResultStore(db).rows("h")} == {0, 9}
    text = write_report(db, tmp_path / "report").read_text()
    assert "chosen on the calibration seeds [9] and scored on the others" in text
    assert "chosen on calibration seeds, scored on held-out seeds" in text
    table = [line for line in text.splitlines() if line.startswith("| flux-digits | uniform")]
    assert table and all(line.split(" | ")[2] == "2" for line in table)  # 2 held-out cells each, seed 9 apart
