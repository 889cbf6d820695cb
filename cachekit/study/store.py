"""Study results in SQLite, one row per finished cell, written in one transaction each: a study
killed mid-run keeps every finished cell and loses only the one in progress. Each study records
the protocol its cells were measured under (steps, guidance, resolution, device, repeats, ...): a
later run under another protocol is refused rather than mixed with them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

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
            self._create_tables()
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot use {self.path} as a results database: {error}") from None

    def _create_tables(self) -> None:
        columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        with self._db:
            self._db.execute(f"CREATE TABLE IF NOT EXISTS cells ({columns}, PRIMARY KEY ({', '.join(KEY)}))")
            present = {row["name"] for row in self._db.execute("PRAGMA table_info(cells)")}
            for name in COLUMNS.keys() - present:  # a database written by an earlier cachekit
                self._db.execute(f"ALTER TABLE cells ADD COLUMN {name} {COLUMNS[name].replace(' NOT NULL', '')}")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outputs (study TEXT, model TEXT, seed INTEGER, condition TEXT, "
                "output BLOB, PRIMARY KEY (study, model, seed, condition))"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS protocols (study TEXT PRIMARY KEY, protocol TEXT NOT NULL)")

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

    def add(self, row: dict[str, Any], reference: torch.Tensor | None = None) -> bool:
        """Record a finished cell (and, for the uncached cell, its output as the reference); False
        when another writer recorded it first (the first result stays)."""
        values = {name: _cell(row.get(name)) for name in COLUMNS}
        with self._db:
            inserted = self._db.execute(
                f"INSERT OR IGNORE INTO cells ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                tuple(values.values()),
            ).rowcount
            if not inserted:
                return False
            if reference is not None:
                blob = save({"output": reference.contiguous().cpu()})
                key = (row["study"], row["model"], row["seed"], row["condition"])
                self._db.execute("INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?, ?)", (*key, blob))
        return True

    def reference(self, study: str, model: str, seed: int, condition: str) -> tuple[torch.Tensor, float]:
        """The uncached cell's output and median latency, for the cells compared against it."""
        query = (
            "SELECT o.output, c.latency_s FROM outputs o JOIN cells c ON c.study = o.study AND c.model = o.model "
            "AND c.seed = o.seed AND c.condition = o.condition AND c.setting = 'uncached' "
            "WHERE o.study = ? AND o.model = ? AND o.seed = ? AND o.condition = ?"
        )
        found = self._db.execute(query, (study, model, seed, condition)).fetchone()
        if found is None:
            raise LookupError(f"no uncached reference for {model} seed={seed} {condition!r} in study {study!r}")
        return load(bytes(found["output"]))["output"], found["latency_s"]

    def rows(self, study: str | None = None) -> list[dict[str, Any]]:
        query, args = (
            ("SELECT * FROM cells", ()) if study is None else ("SELECT * FROM cells WHERE study = ?", (study,))
        )
        return [dict(row) for row in self._db.execute(query + " ORDER BY rowid", args)]

    def studies(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT DISTINCT study FROM cells ORDER BY rowid")]

    def clear(self, study: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM cells WHERE study = ?", (study,))
            self._db.execute("DELETE FROM outputs WHERE study = ?", (study,))
            self._db.execute("DELETE FROM protocols WHERE study = ?", (study,))


def _cell(value: Any) -> Any:
    """Lists and dicts go in as JSON."""
    return json.dumps(value) if isinstance(value, list | dict) else value
