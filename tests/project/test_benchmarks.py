"""The benchmarks run where CI can see them: the full-size GPU benchmark at tiny width on the CPU
(so it is known to work before a GPU is lent), and the memory table from the meta device."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import ROOT, cell_row

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_the_gpu_benchmark_runs_at_tiny_width_on_the_cpu(tmp_path):
    import gpu

    results = gpu.main(
        [
            "--device", "cpu", "--steps", "3", "--repeats", "1", "--strategies", "uniform",
            "--settings", "uniform 2", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert [(run["family"], run["steps"]) for run in written["runs"]] == [("flux.1-dev", 3), ("wan2.1-t2v-1.3b", 3)]
    for run in written["runs"]:
        assert set(run["strategies"]) == {"uniform"}
        uniform = run["strategies"]["uniform"]
        assert uniform["hooked"] == (57 if run["family"] == "flux.1-dev" else 30)
        assert uniform["syncs_per_call"] == 0
        assert uniform["reused_cost"] < 1 and uniform["host_reused_per_hook"] is not None
        assert run["inner_block"]["hooked"] > run["inner_block"]["passing"] > 0
        speedup = run["speedups"]["uniform 2"]
        assert speedup["computed_share"] == pytest.approx(2 / 3)  # steps 0 and 2 of 3 (the last forced)
        assert speedup["limit"] == pytest.approx(1 / (2 / 3 + 1 / 3 * uniform_cost(run)), rel=0.5)
    table = (tmp_path / "results.md").read_text()
    assert "| uniform |" in table and "| uniform 2 | 0.67 |" in table and "cpu, torch" in table


def uniform_cost(run):
    return run["strategies"]["uniform"]["reused_cost"]


@pytest.mark.slow
def test_the_memory_table_matches_the_sizes_of_what_is_kept():
    """FLUX.1-dev at 1024^2: the span's residual on 4096 image and 512 text tokens at width 3072,
    in bf16, per branch; a Taylor forecast of order 2 keeps three."""
    import memory

    table = memory.table()
    residual = (4096 + 512) * 3072 * 2 * 2  # bytes, two branches
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert f"| {residual / 2**30:.2f} GiB |" in rows["uniform, copy (span)"]
    assert f"| {3 * residual / 2**30:.2f} GiB |" in rows["uniform, taylor 2 (span)"]


def frontier_rows(ours: list[float], theirs: list[float], seed0: int = 0, spent: float = 0.3) -> list[dict]:
    """One sample per seed for the uncached reference, a cachekit setting (spending `spent`) and a
    diffusers one (30%)."""
    rows = []
    for seed, (mine, peer) in enumerate(zip(ours, theirs, strict=True), start=seed0):
        for setting, strategy, psnr, share in (
            ("uncached", "uncached", float("inf"), 1.0),
            ("a", "uniform", mine, spent),
            ("b", "diffusers.first_block_cache", peer, 0.3),
        ):
            rows.append(cell_row(setting, seed, psnr, share, strategy))
    return rows


def test_the_frontier_calls_cachekit_ahead_only_by_a_margin_with_the_paired_interval_above_zero():
    import frontier

    from cachekit.study.report import summarize

    chosen_on = summarize(frontier_rows([45, 45, 45, 45], [44, 44, 44, 44], seed0=100))  # calibration cells

    def outcome(ours, theirs, spent=0.3):
        text = frontier.verdict("t", summarize(frontier_rows(ours, theirs, spent=spent)), chosen_on, (0.2, 0.3))
        assert text.splitlines()[1].endswith("-> no cachekit method fits")  # nothing at 20%
        return text.splitlines()[2]

    clear = outcome([50, 52, 51, 53], [40, 41, 40, 42])
    assert "; paired difference 10.75 [" in clear and clear.endswith("-> ahead by 10.8 dB")
    assert outcome([40.5, 41.5, 40.6, 42.4], [40, 41, 40, 42]).endswith("-> ahead by less than 1 dB")
    assert outcome([50, 40, 50, 40], [45, 45, 45, 45]).endswith("-> a tie")
    assert outcome([30, 31, 30, 31], [40, 41, 40, 41]).endswith("-> BEHIND")
    assert outcome([50, 52, 51, 53], [40, 41, 40, 42], spent=0.35).endswith("-> OVERSPENT (35.0%)")


def test_the_branch_level_table_compares_the_best_of_each_side_held_out():
    import frontier

    from cachekit.study.report import summarize

    def rows(alone: list[float], both: list[float], seed0: int = 0) -> list[dict]:
        found = []
        for seed, (step_level, branch_level) in enumerate(zip(alone, both, strict=True), start=seed0):
            for setting, method, psnr, share in (
                ("uncached", "uncached", float("inf"), 1.0),
                ("a", "schedule+dmd", step_level, 0.3),
                ("b", "schedule + dmd, branches every 2nd (dmd)", branch_level, 0.28),
                ("c", "fastercache", 60.0, 0.7),  # never within these budgets
            ):
                found.append(cell_row(setting, seed, psnr, share, method))
        return found

    chosen_on = summarize(rows([45, 45, 45, 45], [44, 44, 44, 44], seed0=100))

    def line(alone, both):
        text = frontier.branch_level_against_step_level(summarize(rows(alone, both)), chosen_on, (0.2, 0.3))
        assert text.splitlines()[1].endswith("-> one side does not fit")  # nothing at 20%
        return text.splitlines()[2]

    behind = line([50, 52, 51, 53], [40, 41, 40, 42])
    assert "with 40.75 (b, spent 28.0%); alone 51.50 (a, spent 30.0%)" in behind
    assert behind.endswith("-> BEHIND")
    assert line([40, 41, 40, 42], [50, 52, 51, 53]).endswith("-> ahead")
    assert line([45, 45, 45, 45], [50, 40, 50, 40]).endswith("-> a tie")
    assert frontier.uses_branches(summarize(rows([1], [1]))[-1]) is True


@pytest.mark.parametrize("name", ["frontier.toml", "branches.toml"])
def test_the_benchmark_studies_plan(tmp_path, name):
    """The frontier's specs as `frontier.py` writes them: every entry a valid method (a typo in a
    setting would otherwise surface after the first 20 minutes)."""
    from cachekit.study.plan import load_spec, plan

    text = (ROOT / "benchmarks" / name).read_text()
    if name == "frontier.toml":
        text = 'models = ["wan-moving-digits"]\n' + text.replace("{model}", "wan-moving-digits").replace(
            "{steps}", "28"
        )
    spec = tmp_path / name
    spec.write_text(text)
    cells = plan(load_spec(spec)).cells
    methods = {cell.setting.method for cell in cells}
    assert len(methods) >= 8
    if name == "branches.toml":
        assert {"fastercache", "schedule+meancache", "schedule+dmd"} <= methods
