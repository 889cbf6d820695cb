"""Study results in SQLite, one row per finished cell, written in one transaction each: a study
killed mid-run keeps every finished cell and loses only the one in progress. Each study records
the protocol its cells were measured under (steps, guidance, resolution, device, repeats, ...): a
later run under another protocol is refused rather than mixed with them.

Several processes may write one database at once (WAL, a long busy timeout; a cell another
writer recorded first counts as done). The uncached outputs the other cells are compared with
are safetensors files in a folder beside the database (`results.references/` for
`results.sqlite`), so a video-sized reference never holds the database's write lock while it is
written. Where SQLite's locking cannot be trusted (some network file systems), each process
writes a database of its own and `merge` gathers them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save_file

from cachekit.errors import CachekitError


class StoreError(CachekitError, RuntimeError):
    """A results database that cannot be used as asked (missing, unwritable, another protocol)."""


COLUMNS = {
    "study": "TEXT NOT NULL",
    "model": "TEXT NOT NULL",
    "setting": "TEXT NOT NULL",  # canonical config JSON, or "uncached"
    "seed": "INTEGER NOT NULL",
    "condition": "TEXT NOT NULL",
    "label": "TEXT NOT NULL",
    "method": "TEXT",  # the policy entry the setting comes from
    "strategy": "TEXT NOT NULL",
    "latency_s": "REAL",  # median of the timed repeats
    "latencies_s": "TEXT",  # JSON list of every timed repeat
    "speedup": "REAL",  # the uncached cell's median latency / this cell's
    "calls": "INTEGER",  # transformer calls
    "computed_calls": "INTEGER",  # calls that ran the residual span, per the policy (NULL: it does not say)
    "reused_calls": "INTEGER",
    "block_executions": "INTEGER",  # blocks whose attention or MLP ran, counted from the outside
    "block_share": "REAL",  # block_executions / (calls x blocks)
    "attention_computed": "INTEGER",  # attention modules that ran, counted from the outside
    "attention_reused": "INTEGER",
    "flops": "REAL",  # estimated FLOPs spent
    "flops_saved": "REAL",  # estimated FLOPs not spent thanks to reuse
    "psnr": "REAL",  # dB against the uncached cell; inf when equal
    "ssim": "REAL",
    "ms_ssim": "REAL",
    "lpips": "REAL",
    "latents_sha": "TEXT",  # fingerprint of the transformer's first input: the initial latents
    "decisions": "TEXT",  # JSON: per CFG branch, the span schedule and module sites computed per call
    "stats": "TEXT",  # JSON: the handle's stats of the last generation, and the policy's info
    "notes": "TEXT",  # JSON list
    "finished_at": "TEXT",
    "process": "TEXT",  # which process of how many measured it, on which device
}
KEY = ("study", "model", "setting", "seed", "condition")


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

    @property
    def references(self) -> Path:
        """The folder of the uncached outputs, beside the database."""
        return self.path.with_suffix(".references")

    def reference_path(self, study: str, model: str, seed: int, condition: str) -> Path:
        key = json.dumps([study, model, seed, condition])
        return self.references / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"

    def _create_tables(self) -> None:
        columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        with self._db:
            self._db.execute(f"CREATE TABLE IF NOT EXISTS cells ({columns}, PRIMARY KEY ({', '.join(KEY)}))")
            present = {row["name"] for row in self._db.execute("PRAGMA table_info(cells)")}
            for name in COLUMNS.keys() - present:  # a database written by an earlier cachekit
                self._db.execute(f"ALTER TABLE cells ADD COLUMN {name} {COLUMNS[name].replace(' NOT NULL', '')}")
            self._db.execute("CREATE TABLE IF NOT EXISTS protocols (study TEXT PRIMARY KEY, protocol TEXT NOT NULL)")

    def _move_blob_references(self) -> None:
        """Databases written by an earlier cachekit kept the references as blobs: move them out."""
        if not self._has_table("outputs"):
            return
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")  # one writer moves them
            if not self._has_table("outputs"):
                return
            for row in self._db.execute("SELECT study, model, seed, condition, output FROM outputs").fetchall():
                self._write_file(load(bytes(row["output"]))["output"], self.reference_path(*tuple(row)[:4]))
            self._db.execute("DROP TABLE outputs")

    def _has_table(self, name: str) -> bool:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self._db.execute(query, (name,)).fetchone() is not None

    def check_protocol(self, study: str, protocol: dict[str, Any]) -> None:
        """Record the protocol of `study`'s cells, or refuse one that differs from the recorded one."""
        text = json.dumps(protocol, sort_keys=True)
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO protocols VALUES (?, ?)", (study, text))
        recorded = json.loads(
            self._db.execute("SELECT protocol FROM protocols WHERE study = ?", (study,)).fetchone()[0]
        )
        changed = {key: (recorded.get(key), value) for key, value in protocol.items() if recorded.get(key) != value}
        if changed:
            differences = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
            raise StoreError(
                f"{self.path} holds study {study!r} measured under another protocol ({differences}): its cells cannot "
                "be mixed with new ones; run with --fresh to recompute them, or give another --db or study name"
            )

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

    def add(self, row: dict[str, Any], reference: torch.Tensor | None = None) -> bool:
        """Record a finished cell (and, for the uncached cell, its output as the reference); False
        when another writer recorded it first: the first result and its reference stay."""
        return self._insert(row, lambda path: self._write_file(reference, path) if reference is not None else None)

    def _insert(self, row: dict[str, Any], write_reference: Any) -> bool:
        """Insert the row; for an uncached cell, `write_reference(path)` writes its reference file
        first, and it takes its place only if the row goes in, inside the row's transaction."""
        values = tuple(_cell(row.get(name)) for name in COLUMNS)
        final = self.reference_path(row["study"], row["model"], row["seed"], row["condition"])
        staged = final.with_name(f"{final.stem}.{uuid.uuid4().hex}.partial")
        if row["setting"] == "uncached":
            staged.parent.mkdir(parents=True, exist_ok=True)
            write_reference(staged)
        try:
            with self._db:
                query = f"INSERT OR IGNORE INTO cells ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
                inserted = self._db.execute(query, values).rowcount > 0
                if inserted and staged.exists():
                    os.replace(staged, final)  # still under the write lock: no other writer's row in between
        finally:
            staged.unlink(missing_ok=True)
        return inserted

    def _write_file(self, tensor: torch.Tensor, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"output": tensor.detach().contiguous().cpu()}, path)

    def reference(self, study: str, model: str, seed: int, condition: str) -> tuple[torch.Tensor, float]:
        """The uncached cell's output and median latency, for the cells compared against it."""
        query = (
            "SELECT latency_s FROM cells WHERE study = ? AND model = ? AND seed = ? AND condition = ? "
            "AND setting = 'uncached'"
        )
        found = self._db.execute(query, (study, model, seed, condition)).fetchone()
        path = self.reference_path(study, model, seed, condition)
        if found is None or not path.is_file():
            raise LookupError(f"no uncached reference for {model} seed={seed} {condition!r} in study {study!r}")
        return load_file(path)["output"], found["latency_s"]

    def merge(self, other: ResultStore) -> Merged:
        """Add the cells of `other` (a database of one process's cells) that this one lacks, with
        their references; a study recorded here under another protocol is refused."""
        added = duplicates = 0
        for study, text in other._db.execute("SELECT study, protocol FROM protocols").fetchall():
            self.check_protocol(study, json.loads(text))
        for row in other.rows():
            source = other.reference_path(row["study"], row["model"], row["seed"], row["condition"])
            if self._insert(row, lambda path, source=source: shutil.copyfile(source, path)):
                added += 1
            else:
                duplicates += 1
        return Merged(added, duplicates)

    def rows(self, study: str | None = None) -> list[dict[str, Any]]:
        query, args = (
            ("SELECT * FROM cells", ()) if study is None else ("SELECT * FROM cells WHERE study = ?", (study,))
        )
        return [dict(row) for row in self._db.execute(query + " ORDER BY rowid", args)]

    def studies(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT DISTINCT study FROM cells ORDER BY rowid")]

    def clear(self, study: str) -> None:
        with self._db:
            for row in self._db.execute("SELECT model, seed, condition FROM cells WHERE study = ?", (study,)):
                self.reference_path(study, *tuple(row)).unlink(missing_ok=True)
            self._db.execute("DELETE FROM cells WHERE study = ?", (study,))
            self._db.execute("DELETE FROM protocols WHERE study = ?", (study,))


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
