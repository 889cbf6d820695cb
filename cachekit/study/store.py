"""Study results in SQLite, one row per finished cell, written in one transaction each: a study
killed mid-run keeps every finished cell and loses only the one in progress. Each study records
the protocol its cells were measured under (steps, guidance, resolution, device, repeats, ...): a
later run under another protocol is refused rather than mixed with them.

Every cell's output is kept as files in a folder beside the database (`results.samples/` for
`results.sqlite`): `<study>/<model>/<setting>/<condition>-seed<seed>` with `.png` (images) or
`.mp4` (videos) and `.safetensors` (the tensor; always for the uncached outputs the other cells
are compared with). Each row's `sample` and `files` columns index them. Files are written before
the row's transaction and moved into place inside it, so a video-sized output never holds the
write lock while it is written, and a killed writer leaves no half-written sample behind.

Several processes may write one database at once (WAL, a long busy timeout; a cell another
writer recorded first counts as done). Where SQLite's locking cannot be trusted (some network
file systems), each process writes a database of its own and `merge` gathers them.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import shutil
import socket
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save_file

from cachekit.errors import CachekitError
from cachekit.study.samples import TENSOR, model_slug, slug, write_sample


class StoreError(CachekitError, RuntimeError):
    """A results database that cannot be used as asked (missing, unwritable, another protocol)."""


COLUMNS = {
    "study": "TEXT NOT NULL",
    "model": "TEXT NOT NULL",
    "setting": "TEXT NOT NULL",  # canonical config JSON, or "uncached"
    "seed": "INTEGER NOT NULL",
    "condition": "TEXT NOT NULL",
    "label": "TEXT NOT NULL",
    "method": "TEXT",  # the strategy entry the setting comes from
    "strategy": "TEXT NOT NULL",
    "latency_s": "REAL",  # median of the timed repeats
    "latencies_s": "TEXT",  # JSON list of every timed repeat
    "speedup": "REAL",  # the uncached cell's median latency / this cell's
    "calls": "INTEGER",  # transformer calls
    "computed_calls": "INTEGER",  # calls that ran the residual span, per the strategy (NULL: it does not say)
    "reused_calls": "INTEGER",
    "block_executions": "INTEGER",  # blocks whose attention or MLP ran, counted from the outside
    "block_share": "REAL",  # block_executions / (calls x blocks)
    "attention_computed": "INTEGER",  # attention modules that ran, counted from the outside
    "attention_reused": "INTEGER",
    "flops": "REAL",  # estimated FLOPs spent
    "flops_saved": "REAL",  # estimated FLOPs not spent thanks to reuse
    "metrics": "TEXT",  # JSON: each quality metric's value by name (psnr: dB against the uncached cell, inf when equal)
    "latents_sha": "TEXT",  # fingerprint of the transformer's first input: the initial latents
    "decisions": "TEXT",  # JSON: per CFG branch, the span schedule and module sites computed per call
    "stats": "TEXT",  # JSON: the handle's stats of the last generation, and the strategy's info
    "notes": "TEXT",  # JSON list
    "finished_at": "TEXT",
    "process": "TEXT",  # which process of how many measured it, on which device
    "sample": "TEXT",  # where its output lies, relative to the samples folder, without suffix
    "files": "TEXT",  # JSON list of its files (PNG/MP4, safetensors), relative to the samples folder
}
PARTIAL = ".partial"  # the samples folder's staging area
KEY = ("study", "model", "setting", "seed", "condition")
UNCACHED = "uncached"  # the setting (and label) of the reference cells


#: Seconds a writer waits for another one's transaction before giving up.
BUSY_TIMEOUT = 300


class ResultStore:
    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"no results database at {self.path}: run `cachekit study run` to make one")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT)
            self._db.row_factory = sqlite3.Row
            _when_unlocked(self._prepare)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot use {self.path} as a results database: {error}") from None

    def _prepare(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
        self._create_tables()
        self._move_blob_references()
        self._remove_abandoned_staging()

    @property
    def samples(self) -> Path:
        """The folder of every cell's files, beside the database."""
        return self.path.with_suffix(".samples")

    def _create_tables(self) -> None:
        columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        with self._db:
            self._db.execute(f"CREATE TABLE IF NOT EXISTS cells ({columns}, PRIMARY KEY ({', '.join(KEY)}))")
            present = {row["name"] for row in self._db.execute("PRAGMA table_info(cells)")}
            for name in COLUMNS.keys() - present:  # a database written by an earlier cachekit
                self._db.execute(f"ALTER TABLE cells ADD COLUMN {name} {COLUMNS[name].replace(' NOT NULL', '')}")
            self._db.execute("CREATE TABLE IF NOT EXISTS protocols (study TEXT PRIMARY KEY, protocol TEXT NOT NULL)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS runs (study TEXT NOT NULL, started_at TEXT NOT NULL, spec TEXT NOT NULL, "
                "planned INTEGER NOT NULL, environment TEXT NOT NULL)"
            )

    def _move_blob_references(self) -> None:
        """Databases written by an earlier cachekit kept the references as blobs: move them out."""
        if not self._has_table("outputs"):
            return
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")  # one writer moves them
            if not self._has_table("outputs"):
                return
            for row in self._db.execute("SELECT study, model, seed, condition, output FROM outputs").fetchall():
                study, model, seed, condition = tuple(row)[:4]
                stem = sample_stem(study, model, UNCACHED, seed, condition)
                path = self.samples / f"{stem}{TENSOR}"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({"output": load(bytes(row["output"]))["output"]}, path)
                self._db.execute(
                    "UPDATE cells SET sample = ?, files = ? WHERE study = ? AND model = ? AND seed = ? AND "
                    "condition = ? AND setting = ?",
                    (stem, json.dumps([f"{stem}{TENSOR}"]), study, model, seed, condition, UNCACHED),
                )
            self._db.execute("DROP TABLE outputs")

    def _has_table(self, name: str) -> bool:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self._db.execute(query, (name,)).fetchone() is not None

    def protocols(self) -> dict[str, dict[str, Any]]:
        """The recorded protocol of each study, per model."""
        return {study: json.loads(text) for study, text in self._db.execute("SELECT study, protocol FROM protocols")}

    def check_protocol(self, study: str, protocol: dict[str, Any]) -> None:
        """Record the protocol of `study`'s cells per model, or refuse one that differs from the
        recorded one for a model with cells (a model new to the study, or one with no cell yet,
        takes the new one)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            found = self._db.execute("SELECT protocol FROM protocols WHERE study = ?", (study,)).fetchone()
            measured = {
                row[0] for row in self._db.execute("SELECT DISTINCT model FROM cells WHERE study = ?", (study,))
            }
            recorded = {
                model: fields for model, fields in (json.loads(found[0]) if found else {}).items() if model in measured
            }
            differences = protocol_differences(recorded, protocol)
            if differences:
                raise StoreError(
                    f"{self.path} holds study {study!r} measured under another protocol ({differences}): its cells "
                    "cannot be mixed with new ones; run with --fresh to recompute them, or give another --db or "
                    "study name"
                )
            text = json.dumps({**recorded, **protocol}, sort_keys=True)
            self._db.execute("INSERT OR REPLACE INTO protocols VALUES (?, ?)", (study, text))

    def record_run(self, study: str, spec: dict[str, Any], planned: int, environment: dict[str, Any]) -> None:
        """What a run of `study` was asked to do, where: the report echoes it."""
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        with self._db:
            self._db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                (study, started, json.dumps(spec), planned, json.dumps(environment)),
            )

    def runs(self, study: str) -> list[dict[str, Any]]:
        """The runs of `study`, oldest first: when, the spec, the cells planned, the environment."""
        query = "SELECT * FROM runs WHERE study = ? ORDER BY rowid"
        return [
            {**dict(row), "spec": json.loads(row["spec"]), "environment": json.loads(row["environment"])}
            for row in self._db.execute(query, (study,))
        ]

    def close(self) -> None:
        self._db.close()

    def finished(self, study: str) -> set[tuple[Any, ...]]:
        """Keys (model, setting, seed, condition) of the cells already done."""
        query = "SELECT model, setting, seed, condition FROM cells WHERE study = ?"
        return {tuple(row) for row in self._db.execute(query, (study,))}

    def has(self, study: str, model: str, setting: str, seed: int, condition: str) -> bool:
        """Whether the cell is done (by this writer or another)."""
        query = "SELECT 1 FROM cells WHERE study = ? AND model = ? AND setting = ? AND seed = ? AND condition = ?"
        return self._db.execute(query, (study, model, setting, seed, condition)).fetchone() is not None

    def add(self, row: dict[str, Any], output: torch.Tensor | None = None, fps: int = 8, tensor: bool = True) -> bool:
        """Record a finished cell with its output's files (PNG/MP4, and the tensor where `tensor`
        or the cell is the uncached reference); False when another writer recorded it first: the
        first result and its files stay."""
        with self._staging() as staging:
            written = []
            if output is not None:
                keep_tensor = tensor or row["setting"] == UNCACHED
                try:
                    written = write_sample(output, Path(staging) / "sample", fps, keep_tensor)
                except OSError as error:
                    raise StoreError(
                        f"cannot write the output of {row['model']} {row['label']!r} seed={row['seed']} "
                        f"{row['condition']!r} into {self.samples}: {error.strerror or error}; the cells finished "
                        "before it are kept: free space (or fix the folder) and run again to go on"
                    ) from None
            return self._insert(row, {path.name.removeprefix("sample"): path for path in written})

    def _staging(self) -> tempfile.TemporaryDirectory[str]:
        """A folder of its own in the samples folder (so files move into place without a copy),
        for files written before their row's transaction; removed with what was not moved. Its
        name says which process made it, so a killed writer's folder is removed later
        (`_remove_abandoned_staging`)."""
        parent = self.samples / PARTIAL
        parent.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(dir=parent, prefix=f"{_this_process()}-", ignore_cleanup_errors=True)

    def _remove_abandoned_staging(self) -> None:
        """Remove the staging folders of writers on this machine that are no longer running."""
        parent = self.samples / PARTIAL
        host = socket.gethostname()
        for folder in parent.glob(f"{host}-*-*") if parent.is_dir() else []:
            pid = folder.name.removeprefix(f"{host}-").split("-")[0]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)

    def _insert(self, row: dict[str, Any], staged: dict[str, Path]) -> bool:
        """Insert the row; its files (`staged`, by what follows the stem: ".png", "-0.mp4", ...)
        take their place under a stem no other row holds, inside the row's transaction."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if self.has(*(row[name] for name in KEY)):
                return False
            stem = base = sample_stem(row["study"], row["model"], row["label"], row["seed"], row["condition"])
            for number in itertools.count(2):  # a stem another setting's row holds (a label used before)
                if self._db.execute("SELECT 1 FROM cells WHERE sample = ?", (stem,)).fetchone() is None:
                    break
                stem = f"{base}~{number}"
            files = [f"{stem}{ending}" for ending in staged]
            row = {**row, "sample": stem if staged else None, "files": files if staged else None}
            query = f"INSERT INTO cells ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
            self._db.execute(query, tuple(_cell(row.get(name)) for name in COLUMNS))
            for name, path in zip(files, staged.values(), strict=True):
                (self.samples / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, self.samples / name)  # still under the write lock
        return True

    def reference(self, study: str, model: str, seed: int, condition: str) -> tuple[torch.Tensor, float]:
        """The uncached cell's output and median latency, for the cells compared against it."""
        query = (
            "SELECT latency_s, sample FROM cells WHERE study = ? AND model = ? AND seed = ? AND condition = ? "
            "AND setting = ?"
        )
        found = self._db.execute(query, (study, model, seed, condition, UNCACHED)).fetchone()
        cell = f"{model} seed={seed} {condition!r} in study {study!r}"
        if found is None or not found["sample"]:
            raise StoreError(f"no uncached reference for {cell} in {self.path}: run with --fresh to compute it")
        path = self.samples / f"{found['sample']}{TENSOR}"
        if not path.is_file():
            raise StoreError(
                f"the uncached reference for {cell} was recorded, but its file {path} is gone (the samples folder "
                "moved or was deleted?): put it back, or run with --fresh to recompute the study"
            )
        try:
            return load_file(path)["output"], found["latency_s"]
        except Exception as error:  # safetensors raises its own errors for a truncated or foreign file
            raise StoreError(
                f"the uncached reference for {cell} cannot be read from {path} ({error}): the file is damaged "
                "(a full disk, or a copy cut short?); run with --fresh to recompute the study"
            ) from None

    def merge(self, other: ResultStore) -> Merged:
        """Add the cells and runs of `other` (a database of one process's cells) that this one
        lacks, with their files. Protocols are the caller's to check first (`runner.merge` checks
        every source before merging any): a study recorded here under another one is refused."""
        added = duplicates = 0
        for study, protocol in other.protocols().items():
            self.check_protocol(study, protocol)
        with self._db:
            for run in other._db.execute("SELECT * FROM runs ORDER BY rowid").fetchall():
                same = " AND ".join(f"{name} = ?" for name in run.keys())  # noqa: SIM118 (a Row iterates its values)
                if self._db.execute(f"SELECT 1 FROM runs WHERE {same}", tuple(run)).fetchone() is None:
                    self._db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?)", tuple(run))
        with self._staging() as staging:
            for row in other._db.execute("SELECT * FROM cells ORDER BY rowid").fetchall():
                row = dict(row)
                staged = {}
                for name in json.loads(row["files"] or "[]"):
                    staged[name.removeprefix(row["sample"])] = copy = Path(staging) / Path(name).name
                    shutil.copyfile(other.samples / name, copy)
                if self._insert(row, staged):
                    added += 1
                else:
                    duplicates += 1
        return Merged(added, duplicates)

    def rows(self, study: str | None = None) -> list[dict[str, Any]]:
        """One dict per cell, each quality metric's value also under its own name (`row["psnr"]`),
        and every timed generation's seconds as a list (`row["latencies"]`)."""
        query, args = (
            ("SELECT * FROM cells", ()) if study is None else ("SELECT * FROM cells WHERE study = ?", (study,))
        )
        rows = []
        for found in self._db.execute(query + " ORDER BY rowid", args):
            row = dict(found)
            earlier = {name: row[name] for name in ("psnr", "ssim", "ms_ssim", "lpips") if name in row}  # old columns
            metrics = json.loads(row["metrics"]) if row["metrics"] else earlier
            latencies = json.loads(row["latencies_s"] or "[]") or [row["latency_s"]]  # old rows: the median alone
            rows.append({**metrics, **row, "metrics": metrics, "latencies": latencies})
        return rows

    def studies(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT DISTINCT study FROM cells ORDER BY rowid")]

    def clear(self, study: str) -> None:
        with self._db:
            for (files,) in self._db.execute("SELECT files FROM cells WHERE study = ?", (study,)).fetchall():
                for name in json.loads(files or "[]"):
                    (self.samples / name).unlink(missing_ok=True)
            for table in ("cells", "protocols", "runs"):
                self._db.execute(f"DELETE FROM {table} WHERE study = ?", (study,))


def protocol_differences(recorded: dict[str, Any], protocol: dict[str, Any]) -> str:
    """What differs between two protocols (per model) for the models both know, in the fields both
    record (an earlier cachekit recorded fewer); "" when nothing."""
    changed = {
        f"{model}: {key}": (recorded[model][key], value)
        for model, fields in protocol.items()
        if model in recorded
        for key, value in fields.items()
        if key in recorded[model] and recorded[model][key] != value
    }
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))


def _this_process() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sample_stem(study: str, model: str, label: str, seed: int, condition: str) -> str:
    """Where a cell's files go in the samples folder, without suffix (made unique on insert)."""
    return "/".join([slug(study), model_slug(model), slug(label), f"{slug(condition)}-seed{seed}"])


@dataclass(frozen=True)
class StudyRecords:
    """What a database holds of one study, for reports and exports."""

    name: str
    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    samples: Path  # the folder of its files


def read_study(db: str | Path, study: str | None = None) -> StudyRecords:
    """The cells and runs of `study` in `db` (default: the latest study there)."""
    store = ResultStore(db, create=False)
    try:
        studies = store.studies()
        if not studies or (study is not None and study not in studies):
            raise StoreError(f"{db} holds no study {study!r}; it holds: {', '.join(studies) or 'none'}")
        name = study or studies[-1]
        return StudyRecords(name, store.rows(name), store.runs(name), store.samples)
    finally:
        store.close()


@dataclass(frozen=True)
class Merged:
    added: int  # cells new to the database merged into
    duplicates: int  # cells it had already: the first result stays


def _when_unlocked(action: Any) -> None:
    """Run `action`, again while another process holds a lock SQLite does not wait for (switching
    to WAL while another connection opens the same new database fails at once)."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            return action()
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _cell(value: Any) -> Any:
    """Lists and dicts go in as JSON."""
    return json.dumps(value) if isinstance(value, list | dict) else value
