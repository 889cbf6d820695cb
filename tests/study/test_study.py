"""Studies: same latents for every strategy, resumable after a kill, validated up front, reported."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cachekit import testbed
from cachekit.study import StudySpecError, load_spec, plan, run_study, write_report
from cachekit.study.report import BUDGETS, best_within, summarize
from cachekit.study.store import ResultStore

SPEC = """
name = "tiny"
models = ["flux-digits"]
labels = [3, 7]
seeds = [0, 1]
steps = 6
repeats = 1
warmup = 0

[[strategies]]
strategy = "uniform"
sweep.interval = [2, 3]

[[strategies]]
strategy = "teacache"
coefficients = [1.0, 0.0]
rel_l1_thresh = 0.1
"""


def write_spec(folder: Path, text: str = SPEC) -> Path:
    path = folder / "spec.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny study, run once, with its report."""
    folder = tmp_path_factory.mktemp("study")
    db = run_study(load_spec(write_spec(folder)), folder / "results.sqlite", progress=False)
    return db, write_report(db, folder / "report")


def test_every_strategy_starts_from_the_same_latents(finished):
    db, _ = finished
    rows = ResultStore(db).rows("tiny")
    assert len(rows) == 2 * 2 * 4  # seeds x labels x (uncached + 3 settings)
    fingerprints: dict[tuple, set[str]] = {}
    for row in rows:
        fingerprints.setdefault((row["seed"], row["condition"]), set()).add(row["latents_sha"])
    assert all(len(shas) == 1 for shas in fingerprints.values())
    assert len({next(iter(shas)) for shas in fingerprints.values()}) == 2  # one per seed


def test_uncached_cell_is_exact_and_strategies_are_measured(finished):
    db, _ = finished
    rows = ResultStore(db).rows("tiny")
    for row in rows:
        if row["strategy"] == "uncached":
            assert row["psnr"] == math.inf and row["ssim"] == 1.0 and row["speedup"] == 1.0
            assert row["computed_calls"] == row["calls"] == 12 and row["flops_saved"] == 0
        else:
            assert math.isfinite(row["psnr"]) and row["reused_calls"] > 0
            assert row["computed_calls"] + row["reused_calls"] == row["calls"] == 12
            assert row["flops_saved"] > 0
            decisions = json.loads(row["decisions"])
            assert sum(decisions["0"]["span"]) + sum(decisions["1"]["span"]) == row["computed_calls"]
    uniform2 = next(r for r in rows if r["label"] == "uniform interval=2")
    assert json.loads(uniform2["decisions"])["0"]["span"] == [True, False, True, False, True, True]
    assert uniform2["block_executions"] == 8 * 6  # 8 computed calls x 6 blocks, counted from the outside
    assert uniform2["block_share"] == 8 / 12


def test_report_table_equals_the_database_rows(finished):
    db, report = finished
    assert (report.parent / "pareto.png").stat().st_size > 0
    assert (report.parent / "timeline.png").stat().st_size > 0
    table = [line.split(" | ") for line in report.read_text().splitlines() if line.startswith("| flux-digits")]
    rows = ResultStore(db).rows("tiny")
    assert len(table) == 4
    uncached = [t for r in rows if r["setting"] == "uncached" for t in json.loads(r["latencies_s"])]
    for cells in table:
        label = cells[1]
        group = [r for r in rows if r["label"] == label]
        assert cells[2] == str(len(group))
        timed = [t for r in group for t in json.loads(r["latencies_s"])]
        median = statistics.median(timed)
        assert cells[3] == f"{median:.4f} [{min(timed):.4f}-{max(timed):.4f}]"
        speedup = statistics.median(uncached) / median  # the ratio of median latencies
        flops_spent = sum(r["flops"] for r in group) / sum(r["flops"] + r["flops_saved"] for r in group)
        attention = sum(r["attention_computed"] for r in group) / sum(
            r["attention_computed"] + r["attention_reused"] for r in group
        )
        blocks = sum(r["block_executions"] for r in group) / sum(r["calls"] * 6 for r in group)
        limit = 1 / min(flops_spent, blocks, attention)  # the most the skipped work could give
        assert cells[4] == f"{speedup:.2f}" + (" ⚠" if speedup > limit * (1 + 1e-9) else "")
        assert cells[5] == f"{limit:.2f}"
        computed = sum(r["computed_calls"] for r in group) / sum(r["calls"] for r in group)
        assert cells[6] == f"{computed:.1%}"
        assert cells[7] == f"{blocks:.1%}"
        psnr = statistics.fmean(r["psnr"] for r in group)
        assert cells[10] == ("exact" if psnr == math.inf else f"{psnr:.2f}")
        interval, worst, share_bounds, speedup_bounds = cells[-4], cells[-3], cells[-2], cells[-1].removesuffix(" |")
        share_low, share_high = (float(x.rstrip("%")) / 100 for x in share_bounds.strip("[]").split(", "))
        shares = [r["block_share"] for r in group]
        rounding = 0.0006  # the report gives shares to a tenth of a percent
        assert min(shares) - rounding <= share_low <= statistics.fmean(shares) + rounding
        assert statistics.fmean(shares) - rounding <= share_high <= max(shares) + rounding
        by_cell = {
            (r["seed"], r["condition"]): statistics.median(json.loads(r["latencies_s"]))
            for r in rows
            if r["setting"] == "uncached"
        }
        speedups = [
            by_cell[(r["seed"], r["condition"])] / statistics.median(json.loads(r["latencies_s"])) for r in group
        ]
        speedup_low, speedup_high = (float(x) for x in speedup_bounds.strip("[]").split(", "))
        assert min(speedups) - 0.005 <= speedup_low <= speedup_high <= max(speedups) + 0.005
        finite = [r["psnr"] for r in group if math.isfinite(r["psnr"])]
        if label == "uncached" or not finite:
            assert interval == "-" and worst in ("-", "exact")
            continue
        low, high = (float(x) for x in interval.strip("[]").split(", "))
        assert low <= statistics.fmean(finite) + 0.005 and high >= statistics.fmean(finite) - 0.005
        assert worst == f"{min(finite):.2f}"  # the worst cell


def test_each_budget_winner_is_given_with_its_paired_difference_or_called_a_tie(finished):
    from cachekit.study.intervals import paired_difference
    from cachekit.study.report import budget_tables

    db, _ = finished
    summaries = summarize(ResultStore(db).rows("tiny"))
    text = "\n".join(budget_tables(summaries, budgets=(1.0,)))  # every method fits: teacache vs uniform
    found = re.search(r"Winner: ≤ 100% (?:a tie between (\S+) and (\S+)|(\S+)) \(([+-]\d+\.\d+) \[", text)
    assert found, text
    tie_first, tie_second, winner, shown = found.groups()
    cached = [s for s in summaries if s.quality not in (None, math.inf)]
    best = {
        method: max((s for s in cached if s.method == method), key=lambda s: s.rank)
        for method in ("teacache", "uniform")
    }
    first = tie_first or winner
    assert first == max(best, key=lambda method: best[method].rank)
    second = best["uniform" if first == "teacache" else "teacache"]
    difference = paired_difference(best[first].samples, second.samples)
    assert shown == f"{difference.mean:+.2f}" and (tie_first is not None) == (not difference.excludes_zero)
    assert tie_second in (None, second.method)


def test_the_report_says_what_was_asked_where_it_ran_and_how_far_it_got(finished):
    db, report = finished
    text = report.read_text()
    assert "16 of 16 planned cells finished; 4 model x setting pairs." in text
    assert "## What was asked, and where it ran" in text and '"sweep": {\n        "interval": [\n          2,' in text
    environment = ResultStore(db).runs("tiny")[0]["environment"]
    assert environment["torch"] == torch.__version__ and environment["device"].startswith("cpu")
    assert f"| {environment['device']} | {torch.__version__} |" in text


def test_a_speedup_above_the_compute_limit_is_flagged(tmp_path):
    """Cells whose wall clock says more than their skipped work allows (a disturbed machine) are flagged,
    and the speed plot falls back to FLOPs, saying so."""
    spec = load_spec(write_spec(tmp_path, SPEC.replace("sweep.interval = [2, 3]", "sweep.interval = [2]")))
    db = run_study(spec, tmp_path / "results.sqlite", progress=False)
    with sqlite3.connect(db) as connection:  # as if the uncached cells ran on a loaded machine
        connection.execute("UPDATE cells SET latencies_s = '[10.0]', latency_s = 10.0 WHERE setting = 'uncached'")
    text = write_report(db, tmp_path / "report").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| flux-digits")]
    flagged = [cells[1] for cells in rows if cells[4].endswith("⚠")]
    assert flagged == ["uniform interval=2", "teacache"]
    assert "**Timing flag**: 2 settings measured faster than their skipped work allows" in text
    assert (
        "Speedup axis: FLOPs (uncached FLOPs over FLOPs spent), as wall clock cannot be trusted here: 2 speedups"
        in text
    )
    (summary,) = [s for s in summarize(ResultStore(db).rows("tiny")) if s.label == "uniform interval=2"]
    assert summary.above_limit and summary.compute_limit == pytest.approx(12 / 8, rel=0.2)

    with sqlite3.connect(db) as connection:  # as if timed on an idle machine: time follows the work
        connection.execute(
            "UPDATE cells SET latencies_s = json_array(block_share, block_share), latency_s = block_share"
        )
    text = write_report(db, tmp_path / "report").read_text()
    assert "Timing flag" not in text and "Speedup axis: wall clock (ratio of median latencies)." in text


@pytest.mark.slow
def test_killed_study_resumes_without_recomputing(tmp_path):
    spec = write_spec(tmp_path, SPEC.replace("steps = 6", "steps = 12"))
    db = tmp_path / "results.sqlite"
    command = [sys.executable, "-m", "cachekit", "study", "run", str(spec), "--db", str(db), "--quiet"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _count(db) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = {(r["setting"], r["seed"], r["condition"]): r for r in ResultStore(db).rows("tiny")}
    assert 3 <= len(before) < 16, "the kill must land mid-study"

    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    after = ResultStore(db).rows("tiny")
    keys = [(r["setting"], r["seed"], r["condition"]) for r in after]
    assert len(keys) == len(set(keys)) == 16
    for key, row in before.items():  # finished cells kept as they were: same timings, same time stamp
        again = next(r for r in after if (r["setting"], r["seed"], r["condition"]) == key)
        assert (again["latencies_s"], again["finished_at"]) == (row["latencies_s"], row["finished_at"])

    subprocess.run([*command, "--fresh"], cwd=tmp_path, check=True, capture_output=True)
    assert len(ResultStore(db).rows("tiny")) == 16


@pytest.mark.slow
def test_ctrl_c_says_how_many_cells_are_saved_and_how_to_go_on(tmp_path):
    spec = write_spec(tmp_path, SPEC.replace("steps = 6", "steps = 12"))
    db = tmp_path / "results.sqlite"
    command = [sys.executable, "-m", "cachekit", "study", "run", str(spec), "--db", str(db), "--quiet"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _count(db) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=120)
    saved = _count(db)
    assert process.returncode == 130 and "Traceback" not in errors, errors
    assert f"interrupted: {saved} of 16 cells of study 'tiny' are saved in {db}; run the same command again" in errors
    assert 2 <= saved < 16


def _count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as connection:
            return connection.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('strategy = "uniform"', 'strategy = "fora"'), r"strategies\[0\].*unknown strategy 'fora'; known strategies"),
        (("seeds = [0, 1]", "seeds = []"), r"seeds\n.*at least 1 item"),
        (("sweep.interval = [2, 3]", "sweep.interval = []"), r"strategies\.0\.sweep\n.*sweep.interval is empty"),
        (
            ("sweep.interval = [2, 3]", "sweep.interval = [2, 0]"),
            r"strategies\[0\].*interval\n.*greater than or equal to 1",
        ),
        (('models = ["flux-digits"]', 'models = ["flux-digitz"]'), r"models\[0\]: unknown model 'flux-digitz'"),
        (("labels = [3, 7]", "labels = []"), r"give labels \(testbed models\) or prompts"),
        (("rel_l1_thresh = 0.1", "rel_l1_thresh = 0.1\nsweep.rel_l1_thresh = [0.2]"), r"both swept and set"),
    ],
)
def test_malformed_spec_fails_before_any_model_loads(tmp_path, monkeypatch, change, message):
    monkeypatch.setattr(testbed, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    spec = write_spec(tmp_path, SPEC.replace(*change))
    with pytest.raises(StudySpecError, match=rf"(?s){message}"):
        run_study(load_spec(spec), tmp_path / "results.sqlite", progress=False)
    assert not (tmp_path / "results.sqlite").exists()


def test_default_spec_is_shipped_and_valid():
    spec = load_spec("default")
    cells = plan(spec).cells
    assert [model.name for model in spec.models] == ["flux-digits", "wan-moving-digits"] and spec.steps == 50
    strategies = {cell.setting.config.strategy for cell in cells if cell.setting.config}
    import cachekit

    assert strategies == {*cachekit.list_strategies(), "diffusers.first_block_cache", "diffusers.taylorseer_cache"}
    methods = {cell.setting.method for cell in cells}
    assert "teacache+taylor2" in methods
    assert len({cell.setting.key for cell in cells}) == 1 + 2 + 3 + 3 + 8 + 2
    assert len(cells) == 2 * 2 * 4 * 19


def test_cli_list(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cachekit", "list"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert (
        "strategies: easycache, fastercache, fbcache, magcache, pab, schedule, seacache, taylorseer, teacache, uniform"
        in result.stdout
    )
    estimators = next(line for line in result.stdout.splitlines() if line.startswith("estimators:"))
    assert {"copy", "foca", "taylor"} <= set(estimators.removeprefix("estimators: ").split(", "))
    assert "flux-dev" in result.stdout and "diffusers.first_block_cache" in result.stdout


PEERS = """
name = "peers"
models = ["flux-digits"]
labels = [3]
seeds = [0]
steps = 12
repeats = 1
warmup = 0

[[strategies]]
strategy = "fbcache"
sweep.threshold = [0.2, 0.5]

[[strategies]]
strategy = "diffusers.first_block_cache"
sweep.threshold = [0.2, 0.5]

[[strategies]]
strategy = "uniform"
name = "every third"
interval = 3
estimator = { kind = "taylor", order = 2 }
"""


def test_diffusers_methods_sit_beside_cachekits_and_are_counted_alike(tmp_path):
    """diffusers' FirstBlockCache and cachekit's fbcache at the same threshold: the same block
    executions counted from the outside, the same output; the report ranks methods per budget."""
    db = run_study(load_spec(write_spec(tmp_path, PEERS)), tmp_path / "results.sqlite", progress=False)
    rows = {row["label"]: row for row in ResultStore(db).rows("peers")}
    assert set(rows) == {
        "uncached",
        "fbcache threshold=0.2",
        "fbcache threshold=0.5",
        "diffusers.first_block_cache threshold=0.2",
        "diffusers.first_block_cache threshold=0.5",
        "every third",
    }
    for threshold in (0.2, 0.5):
        ours, theirs = (
            rows[f"fbcache threshold={threshold}"],
            rows[f"diffusers.first_block_cache threshold={threshold}"],
        )
        assert ours["block_executions"] == theirs["block_executions"] < 24 * 6
        assert ours["psnr"] == theirs["psnr"] and ours["flops_saved"] == theirs["flops_saved"] > 0
        assert theirs["computed_calls"] is None and theirs["method"] == "diffusers.first_block_cache"
    # head block at every call, the rest when computed: block share = (24 + computed x 5) / (24 x 6)
    fb = rows["fbcache threshold=0.5"]
    assert fb["block_executions"] == 24 + fb["computed_calls"] * 5
    assert rows["every third"]["method"] == "every third"

    report = write_report(db, tmp_path / "report").read_text()
    table = report[report.index("### flux-digits: best PSNR (dB) within a share of block executions") :]
    summaries = summarize(ResultStore(db).rows("peers"))
    for method in ("fbcache", "diffusers.first_block_cache", "every third"):
        group = [s for s in summaries if s.method == method]
        line = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        for budget, cell in zip(BUDGETS, line.split(" | ")[1:], strict=True):
            best = best_within(group, lambda s: s.blocks, budget)
            assert cell.strip(" |*") == ("—" if best is None else f"{best.quality:.2f}")


KILLED = """
name = "killed"
models = ["flux-digits"]
labels = [1, 2]
seeds = [0]
steps = 40
repeats = 1
warmup = 0

[[strategies]]
strategy = "uniform"
sweep.interval = [2, 3]

[[strategies]]
strategy = "teacache"
coefficients = [1.0, 0.0]
estimator = { kind = "taylor", order = 2 }
sweep.rel_l1_thresh = [0.1, 0.3]
"""
#: What a cell measured, apart from timing: what a resumed study must reproduce exactly.
MEASURED = ("label", "calls", "computed_calls", "block_executions", "flops", "psnr", "ssim", "decisions", "latents_sha")


@pytest.mark.slow
def test_a_study_killed_at_random_points_resumes_to_the_uninterrupted_results(tmp_path):
    import random

    spec = write_spec(tmp_path, KILLED)

    def run(db: Path, kill_at: tuple[int, float] | None = None) -> None:
        """Run to the end, or kill once `kill_at[0]` cells are done plus `kill_at[1]` seconds into the next."""
        command = [sys.executable, "-m", "cachekit", "study", "run", str(spec), "--db", str(db), "--quiet"]
        process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill_at is None:
            assert process.wait() == 0
            return
        cells, extra = kill_at
        deadline = time.monotonic() + 300
        while _count(db) < cells and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(extra)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def measured(db: Path) -> dict[tuple, tuple]:
        rows = ResultStore(db).rows("killed")
        keys = [(r["setting"], r["seed"], r["condition"]) for r in rows]
        assert len(keys) == len(set(keys)), "a cell was written twice"
        return {(r["setting"], r["seed"], r["condition"]): tuple(r[name] for name in MEASURED) for r in rows}

    run(tmp_path / "whole.sqlite")
    whole = measured(tmp_path / "whole.sqlite")
    assert len(whole) == 2 * 5
    chance = random.Random(20261125)
    for trial in range(5):
        db = tmp_path / f"trial-{trial}.sqlite"
        run(db, kill_at=(chance.randint(1, len(whole) - 2), chance.uniform(0.0, 0.3)))
        assert 0 < len(measured(db)) < len(whole), "the kill must land mid-study"
        run(db)  # resume
        assert measured(db) == whole


def test_references_kept_as_blobs_by_an_earlier_cachekit_move_to_files(tmp_path):
    """A database whose references are blobs in an `outputs` table (cachekit before samples were files)."""
    import torch
    from safetensors.torch import save

    db = tmp_path / "old.sqlite"
    reference = torch.randn(2, 3, 8, 8)
    with sqlite3.connect(db) as old:
        old.execute(
            "CREATE TABLE cells (study TEXT NOT NULL, model TEXT NOT NULL, setting TEXT NOT NULL, seed INTEGER NOT "
            "NULL, condition TEXT NOT NULL, label TEXT NOT NULL, strategy TEXT NOT NULL, latency_s REAL, "
            "PRIMARY KEY (study, model, setting, seed, condition))"
        )
        old.execute("INSERT INTO cells VALUES ('s', 'flux-digits', 'uncached', 0, '3', 'uncached', 'uncached', 0.5)")
        old.execute("CREATE TABLE outputs (study TEXT, model TEXT, seed INTEGER, condition TEXT, output BLOB)")
        old.execute("INSERT INTO outputs VALUES ('s', 'flux-digits', 0, '3', ?)", (save({"output": reference}),))
    store = ResultStore(db)
    found, latency = store.reference("s", "flux-digits", 0, "3")
    assert torch.equal(found, reference) and latency == 0.5
    (row,) = store.rows("s")
    assert row["sample"] == "s/flux-digits/uncached/3-seed0"
    assert json.loads(row["files"]) == ["s/flux-digits/uncached/3-seed0.safetensors"]
    assert (tmp_path / "old.samples" / "s/flux-digits/uncached/3-seed0.safetensors").is_file()
    with sqlite3.connect(db) as moved:
        assert moved.execute("SELECT name FROM sqlite_master WHERE name = 'outputs'").fetchone() is None
    assert store.rows("s")[0]["process"] is None  # columns added, the row kept as it was


def test_entries_of_one_strategy_that_differ_outside_their_sweep_keep_their_own_labels(tmp_path):
    """Two TeaCache entries without sweeps: both are planned, labelled apart, reported and drawn."""
    text = SPEC.replace("sweep.interval = [2, 3]", "interval = 2").replace("seeds = [0, 1]", "seeds = [0]")
    text += '\n[[strategies]]\nstrategy = "teacache"\ncoefficients = [2.0, 0.0]\nrel_l1_thresh = 0.1\n'
    spec = load_spec(write_spec(tmp_path, text))
    labels = [setting.label for setting in plan(spec).settings]
    assert labels == ["uncached", "uniform", "teacache", "teacache #3"]
    db = run_study(spec, tmp_path / "results.sqlite", progress=False)
    report = write_report(db, tmp_path / "report").read_text()
    assert "| flux-digits | teacache | 2 |" in report and "| flux-digits | teacache #3 | 2 |" in report
    summaries = summarize(ResultStore(db).rows("tiny"))
    assert len({s.label for s in summaries}) == len(summaries) == 4


def test_two_settings_under_one_label_keep_their_samples_apart(tmp_path):
    """A spec changed between runs can give another setting a label used before: its files go
    beside the first's, not over them; the first writer of a cell keeps its files."""
    import torch

    store = ResultStore(tmp_path / "r.sqlite")
    key = {"study": "s", "model": "m", "seed": 0, "condition": "a cat", "label": "teacache", "strategy": "teacache"}
    images = [torch.full((1, 3, 4, 4), value) for value in (-1.0, 0.0, 1.0)]
    assert store.add({**key, "setting": '{"a": 1}'}, images[0])
    assert store.add({**key, "setting": '{"a": 2}'}, images[1])
    assert not store.add({**key, "setting": '{"a": 2}'}, images[2])  # recorded already: the first stays
    rows = store.rows("s")
    assert [row["sample"] for row in rows] == ["s/m/teacache/a_cat-seed0", "s/m/teacache/a_cat-seed0~2"]
    for row, image in zip(rows, images, strict=False):
        assert sorted(json.loads(row["files"])) == [f"{row['sample']}.png", f"{row['sample']}.safetensors"]
        assert torch.equal(load_file(store.samples / f"{row['sample']}.safetensors")["output"], image)
    assert not list((store.samples / ".partial").iterdir())


def test_the_testbed_computes_with_one_thread_unless_told_and_the_count_is_part_of_the_protocol(tmp_path):
    from cachekit.study.store import StoreError

    small = SPEC.replace("labels = [3, 7]", "labels = [3]").replace("seeds = [0, 1]", "seeds = [0]")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        db = run_study(load_spec(write_spec(tmp_path, small)), tmp_path / "r.sqlite", progress=False)
        assert torch.get_num_threads() == 1
        store = ResultStore(db)
        assert store.protocols()["tiny"]["flux-digits"]["threads"] == 1
        assert "1 threads" in store.runs("tiny")[-1]["environment"]["device"]
        with pytest.raises(StoreError, match=r"another protocol \(flux-digits: threads 1 -> 2\)"):
            run_study(load_spec(write_spec(tmp_path, "threads = 2\n" + small)), db, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_every_plot_of_a_report_gives_a_method_the_same_colour(finished, tmp_path, monkeypatch):
    """Each legend's colour per method, across both plots and every model's panel, from the figures drawn."""
    import matplotlib.axes
    import matplotlib.colors
    import matplotlib.figure

    db, _ = finished
    seen: dict[str, set[str]] = {}

    def record(original):
        def legend(self, handles, labels, *args, **kwargs):
            for handle, label in zip(handles, labels, strict=True):
                if label != "frontier":
                    seen.setdefault(label, set()).add(matplotlib.colors.to_hex(handle.get_color()))
            return original(self, handles, labels, *args, **kwargs)

        return legend

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", record(matplotlib.axes.Axes.legend))
    monkeypatch.setattr(matplotlib.figure.Figure, "legend", record(matplotlib.figure.Figure.legend))
    from cachekit.study.report import method_colours

    summaries = summarize(ResultStore(db).rows("tiny"))
    write_report(db, tmp_path / "report")
    assert seen and all(len(colours) == 1 for colours in seen.values()), seen
    assert len({next(iter(colours)) for colours in seen.values()}) == len(seen)  # and no two share one
    assert set(method_colours(summaries)) == {s.method for s in summaries}
