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


def frontier_rows(ours: list[float], theirs: list[float]) -> list[dict]:
    """One sample per seed for the uncached reference, a cachekit setting and a diffusers one, all at 30%."""
    rows = []
    for seed, (mine, peer) in enumerate(zip(ours, theirs, strict=True)):
        for setting, strategy, psnr in (
            ("uncached", "uncached", float("inf")),
            ("a", "uniform", mine),
            ("b", "diffusers.first_block_cache", peer),
        ):
            rows.append(cell_row(setting, seed, psnr, 1.0 if setting == "uncached" else 0.3, strategy))
    return rows


def test_the_frontier_calls_cachekit_ahead_only_where_the_paired_interval_is_above_zero():
    import frontier

    from cachekit.study.report import summarize

    clear = frontier._verdict("flux-digits", summarize(frontier_rows([50, 52, 51, 53], [40, 41, 40, 42])))
    assert "(paired difference 10.75 [" in clear and "-> cachekit ahead" in clear.splitlines()[2]
    noisy = frontier._verdict("flux-digits", summarize(frontier_rows([50, 40, 50, 40], [45, 45, 45, 45])))
    assert "-> a tie with diffusers" in noisy.splitlines()[2]
    behind = frontier._verdict("flux-digits", summarize(frontier_rows([30, 31, 30, 31], [40, 41, 40, 41])))
    assert "-> BEHIND" in behind.splitlines()[2]
    assert behind.splitlines()[1].endswith("-> no method fits")  # nothing at 20%, nor a cache-dit figure
