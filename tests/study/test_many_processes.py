"""Studies and calibrations spread over processes with `torchrun` (gloo on CPU): each process runs
its share once and the figures equal one process's; several writers on one database lose nothing;
one process alone runs no collective."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TESTS

from cachekit.study.store import ResultStore

SPEC = """
name = "spread"
models = ["flux-digits"]
labels = [3, 7]
seeds = [0, 1]
steps = 6
repeats = 1
warmup = 0

[[strategies]]
strategy = "uniform"
interval = 2

[[strategies]]
strategy = "teacache"
coefficients = [1.0, 0.0]
rel_l1_thresh = 0.1

[[strategies]]
strategy = "fbcache"
threshold = 0.2
"""
#: What a cell measured, apart from timing and who measured it.
MEASURED = (
    "label",
    "calls",
    "computed_calls",
    "reused_calls",
    "block_executions",
    "block_share",
    "flops",
    "flops_saved",
    "psnr",
    "ssim",
    "ms_ssim",
    "decisions",
    "latents_sha",
)
#: Runs the cachekit command with the test-only context-parallel shims installed.
LAUNCHER = f"""
import os, sys
sys.path.insert(0, {str(TESTS)!r})
from context_parallel import install_shims
install_shims(int(os.environ["WORLD_SIZE"]))
from cachekit.cli import main
main(sys.argv[1:])
"""
WATCHDOG_SECONDS = 300


def one_thread() -> dict[str, str]:
    """The environment of a process computing as each torchrun process does (one thread), so
    figures can be compared exactly."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def cachekit(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cachekit", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=one_thread(), capture_output=True, text=True, timeout=WATCHDOG_SECONDS)


def torchrun_command(*args: object, processes: int = 2, shims: Path | None = None) -> list[str]:
    entry = [str(shims)] if shims else ["-m", "cachekit"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [*launch, *entry, *map(str, args)]


def torchrun(*args: object, cwd: Path, processes: int = 2, shims: Path | None = None) -> str:
    done = subprocess.run(
        torchrun_command(*args, processes=processes, shims=shims),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=WATCHDOG_SECONDS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def measured(db: Path, study: str = "spread") -> dict[tuple, tuple]:
    rows = ResultStore(db, create=False).rows(study)
    keys = [(r["model"], r["setting"], r["seed"], r["condition"]) for r in rows]
    assert len(keys) == len(set(keys)), "a cell was written twice"
    return {key: tuple(row[name] for name in MEASURED) for key, row in zip(keys, rows, strict=True)}


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> tuple[Path, dict[tuple, tuple]]:
    """The study's spec, and its figures from one process."""
    folder = tmp_path_factory.mktemp("alone")
    spec = folder / "spec.toml"
    spec.write_text(SPEC)
    assert cachekit("study", "run", spec, "--db", folder / "one.sqlite", "--quiet", cwd=folder).returncode == 0
    return spec, measured(folder / "one.sqlite")


@pytest.mark.slow
def test_a_torchrun_study_runs_each_share_once_and_equals_one_process(alone, tmp_path):
    spec, expected = alone
    out = torchrun("study", "run", spec, "--db", tmp_path / "two.sqlite", "--quiet", "--report", cwd=tmp_path)
    assert out.count("report:") == 1 and out.count("study 'spread'") == 1  # the first process speaks for all
    assert measured(tmp_path / "two.sqlite") == expected
    by_group: dict[tuple, set[str]] = {}
    for row in ResultStore(tmp_path / "two.sqlite").rows("spread"):
        by_group.setdefault((row["seed"], row["condition"]), set()).add(row["process"].split(" (")[0])
    assert all(len(processes) == 1 for processes in by_group.values()), by_group  # a group stays in one process
    shares = sorted(next(iter(processes)) for processes in by_group.values())
    assert shares == ["rank 0 of 2"] * 2 + ["rank 1 of 2"] * 2


@pytest.mark.slow
def test_each_process_may_write_its_own_database_merged_at_the_end(alone, tmp_path):
    spec, expected = alone
    db = tmp_path / "results.sqlite"
    torchrun("study", "run", spec, "--db", db, "--quiet", "--db-per-process", cwd=tmp_path)
    assert measured(db) == expected
    parts = [tmp_path / "results.rank0.sqlite", tmp_path / "results.rank1.sqlite"]
    assert [len(measured(part)) for part in parts] == [8, 8]

    merged = cachekit("study", "merge", tmp_path / "again.sqlite", *parts, cwd=tmp_path)
    assert merged.stdout.count("8 cells added, 0 already in") == 2, merged.stdout + merged.stderr
    assert measured(tmp_path / "again.sqlite") == expected
    twice = cachekit("study", "merge", tmp_path / "again.sqlite", parts[0], cwd=tmp_path)
    assert "0 cells added, 8 already in" in twice.stdout
    missing = cachekit("study", "merge", tmp_path / "again.sqlite", tmp_path / "nowhere.sqlite", cwd=tmp_path)
    assert missing.returncode == 2 and "nothing to merge from" in missing.stderr and "nowhere.sqlite" in missing.stderr


def test_two_study_runs_on_one_database_write_every_cell_once(alone, tmp_path):
    spec, expected = alone
    db = tmp_path / "shared.sqlite"
    command = [sys.executable, "-m", "cachekit", "study", "run", str(spec), "--db", str(db), "--quiet"]
    runs = [
        subprocess.Popen(command, cwd=tmp_path, env=one_thread(), stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for run in runs:
        _, errors = run.communicate(timeout=WATCHDOG_SECONDS)
        assert run.returncode == 0, errors[-3000:]
    assert measured(db) == expected


@pytest.mark.slow
def test_a_calibration_over_two_processes_fits_what_one_process_fits(tmp_path):
    spec = tmp_path / "calibration.toml"
    spec.write_text('model = "flux-digits"\nlabels = [1, 4, 6]\nseeds = [0, 1]\nsteps = 8\norder = 2\n')
    one = cachekit("calibrate", spec, "--out", tmp_path / "one.json", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    out = torchrun("calibrate", spec, "--out", tmp_path / "two.json", cwd=tmp_path)
    assert out.count("coefficients") == 1
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert (first.pop("name"), second.pop("name")) == ("one", "two")  # each named after its file
    assert first == second


@pytest.mark.slow
def test_a_study_of_context_parallel_generations_decides_as_one_process(alone, tmp_path):
    """ulysses = 2 on two processes: one context group splits every generation of the study."""
    spec, expected = alone
    split = tmp_path / "split.toml"
    split.write_text(spec.read_text().replace("warmup = 0\n", "warmup = 0\ncontext_parallel = { ulysses = 2 }\n"))
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    torchrun("study", "run", split, "--db", tmp_path / "split.sqlite", "--quiet", cwd=tmp_path, shims=launcher)
    _same_up_to_rounding(measured(tmp_path / "split.sqlite"), expected)
    processes = {row["process"].split(" (")[0] for row in ResultStore(tmp_path / "split.sqlite").rows()}
    assert processes == {"rank 0 of 2"}  # the first process of the context group writes


def _same_up_to_rounding(found: dict[tuple, tuple], expected: dict[tuple, tuple]) -> None:
    """Split generations compute in another order: decisions and counts equal, quality within
    rounding, FLOPs those of the whole group (replicated work such as embeddings: within 2%)."""
    assert found.keys() == expected.keys()
    exact = [MEASURED.index(name) for name in ("label", "calls", "computed_calls", "decisions", "latents_sha")]
    for key, row in expected.items():
        assert [found[key][i] for i in exact] == [row[i] for i in exact], key
        psnr = MEASURED.index("psnr")
        assert found[key][psnr] == pytest.approx(row[psnr], abs=1e-3), key
        flops = MEASURED.index("flops")
        assert found[key][flops] == pytest.approx(row[flops], rel=0.02), key


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_torchrun_study_resumes_after_either_process_is_killed(alone, tmp_path, rank):
    spec, _ = alone
    slow = tmp_path / "slow.toml"
    slow.write_text(spec.read_text().replace("steps = 6", "steps = 30"))
    db = tmp_path / "killed.sqlite"
    launch = subprocess.Popen(
        torchrun_command("study", "run", slow, "--db", db, "--quiet"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + WATCHDOG_SECONDS
        while _cells(db) < 3 and launch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(_worker(launch.pid, rank), signal.SIGKILL)
        assert launch.wait(timeout=WATCHDOG_SECONDS) != 0
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    before = _cells(db)
    assert 3 <= before < 16, "the kill must land mid-study"

    torchrun("study", "run", slow, "--db", db, "--quiet", cwd=tmp_path)
    whole = tmp_path / "whole.sqlite"
    assert cachekit("study", "run", slow, "--db", whole, "--quiet", cwd=tmp_path).returncode == 0
    assert measured(db) == measured(whole)


def _cells(db: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(db) as connection:
            return connection.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _worker(agent: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank`."""
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    for pid in children:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environment:
            return int(pid)
    raise LookupError(f"no worker of rank {rank} among {children}")


@pytest.mark.slow
def test_a_study_on_a_data_by_context_mesh_of_four_processes(alone, tmp_path):
    """Two context groups of two: each splits its share of the generations."""
    spec, expected = alone
    split = tmp_path / "mesh.toml"
    split.write_text(spec.read_text().replace("warmup = 0\n", "warmup = 0\ncontext_parallel = { ulysses = 2 }\n"))
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    db = tmp_path / "mesh.sqlite"
    torchrun("study", "run", split, "--db", db, "--quiet", cwd=tmp_path, processes=4, shims=launcher)
    _same_up_to_rounding(measured(db), expected)
    processes = sorted(row["process"].split(" (")[0] for row in ResultStore(db).rows())
    assert processes == ["rank 0 of 4"] * 8 + ["rank 2 of 4"] * 8  # the first of each context group


WRITER = """
import sys, torch
from cachekit.study.store import ResultStore
writer, cells = int(sys.argv[1]), int(sys.argv[2])
store = ResultStore("shared.sqlite")
for cell in range(cells):
    key = {"study": "big", "model": "wan", "seed": writer, "condition": str(cell), "label": "x", "strategy": "s"}
    store.add({**key, "setting": "uncached"}, torch.full((100_000_000,), float(writer * 100 + cell)))
    for setting in range(10):
        assert store.add({**key, "setting": f"cached {setting}"})
"""


@pytest.mark.slow
def test_two_writers_with_400_mb_references_lose_nothing(tmp_path):
    """Two processes write cells with ~400 MB references (a float32 480p video) to one database at once."""
    (tmp_path / "writer.py").write_text(WRITER)
    writers = [
        subprocess.Popen([sys.executable, "writer.py", str(writer), "2"], cwd=tmp_path, stderr=subprocess.PIPE)
        for writer in range(2)
    ]
    for writer in writers:
        _, errors = writer.communicate(timeout=WATCHDOG_SECONDS)
        assert writer.returncode == 0, errors.decode()[-3000:]
    store = ResultStore(tmp_path / "shared.sqlite")
    assert len(store.rows("big")) == 2 * 2 * 11
    for writer in range(2):
        for cell in range(2):
            reference, _ = store.reference("big", "wan", writer, str(cell))
            assert reference.numel() == 100_000_000 and reference.unique().tolist() == [float(writer * 100 + cell)]
    assert not list((store.samples / ".partial").iterdir())  # nothing half-written left behind


def test_one_process_runs_no_collective(tmp_path, monkeypatch):
    """Alone (no torchrun, no process group), neither the study nor the strategies call torch.distributed."""
    from cachekit.study import load_spec, run_study

    def refuse(*args, **kwargs):
        raise AssertionError("a collective ran in a single process")

    for name in ("init_process_group", "new_group", "all_reduce", "all_gather", "all_gather_object", "barrier"):
        monkeypatch.setattr(torch.distributed, name, refuse)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", refuse)
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace("seeds = [0, 1]", "seeds = [0]").replace("labels = [3, 7]", "labels = [3]"))
    db = run_study(load_spec(spec), tmp_path / "alone.sqlite", progress=False)
    rows = ResultStore(db).rows("spread")
    assert len(rows) == 4 and all(row["process"].startswith("rank 0 of 1 (cpu") for row in rows)


def test_context_parallel_without_enough_processes_is_refused(tmp_path, monkeypatch):
    from cachekit.study import load_spec, run_study
    from cachekit.study.workers import WorkersError

    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace("warmup = 0\n", "warmup = 0\ncontext_parallel = { ulysses = 2, ring = 2 }\n"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(
        WorkersError, match=r"needs 4 processes per generation: run under `torchrun --nproc-per-node 4`"
    ):
        run_study(load_spec(spec), tmp_path / "x.sqlite", progress=False)
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(WorkersError, match="over 4 processes, which does not divide the 6 started"):
        run_study(load_spec(spec), tmp_path / "x.sqlite", progress=False)
    spec.write_text(SPEC.replace("warmup = 0\n", "warmup = 0\ncontext_parallel = { ulysses = 1 }\n"))
    with pytest.raises(ValueError, match="give ulysses or ring greater than 1"):
        load_spec(spec)


def test_context_parallel_on_a_model_diffusers_cannot_split_is_refused():
    from cachekit.schemas.study import ContextParallel
    from cachekit.study.workers import Workers, WorkersError

    workers = Workers(0, 2, ContextParallel(ulysses=2))
    with pytest.raises(WorkersError, match="Linear has no context-parallel plan in diffusers"):
        workers.parallelize(torch.nn.Linear(2, 2))
