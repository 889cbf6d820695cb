"""`study merge`: databases gathered once each, protocols checked before anything moves."""

from __future__ import annotations

import pytest
import torch

from cachekit.study import merge
from cachekit.study.store import ResultStore, StoreError


def database(path, steps=4, cells=2, study="s"):
    store = ResultStore(path)
    store.check_protocol(study, {"flux-digits": {"steps": steps}})
    store.record_run(study, {"name": study, "steps": steps}, cells, {"torch": "x"})
    for seed in range(cells):
        row = {
            "study": study,
            "model": "flux-digits",
            "setting": "uncached",
            "seed": seed,
            "condition": "c",
            "label": "uncached",
            "strategy": "uncached",
            "latency_s": 1.0,
        }
        store.add(row, torch.full((1, 3, 4, 4), float(seed)))
    store.close()
    return path


def contents(path):
    store = ResultStore(path, create=False)
    try:
        return len(store.rows()), len(store.runs("s")), sorted(p.name for p in store.samples.rglob("*.safetensors"))
    finally:
        store.close()


def test_merging_twice_adds_no_run_record_and_no_cell(tmp_path):
    source = database(tmp_path / "a.sqlite")
    merge(tmp_path / "all.sqlite", [source])
    first = contents(tmp_path / "all.sqlite")
    again = merge(tmp_path / "all.sqlite", [source])
    assert again[source].added == 0 and again[source].duplicates == 2
    assert contents(tmp_path / "all.sqlite") == first == (2, 1, ["c-seed0.safetensors", "c-seed1.safetensors"])


def test_a_database_merged_into_itself_or_given_twice_is_refused(tmp_path):
    source = database(tmp_path / "a.sqlite")
    with pytest.raises(StoreError, match=r"cannot merge .*a\.sqlite into itself"):
        merge(tmp_path / "a.sqlite", [tmp_path / "." / "a.sqlite"])
    assert contents(source) == (2, 1, ["c-seed0.safetensors", "c-seed1.safetensors"])
    (tmp_path / "sub").mkdir()
    with pytest.raises(StoreError, match=r"a\.sqlite given more than once: give each database to merge once"):
        merge(tmp_path / "all.sqlite", [source, tmp_path / "sub" / ".." / "a.sqlite"])
    assert not (tmp_path / "all.sqlite").exists()


@pytest.mark.parametrize("against", ["target", "another source"])
def test_a_protocol_mismatch_merges_nothing_and_names_what_merge_allows(tmp_path, against):
    first = database(tmp_path / "a.sqlite")
    other = database(tmp_path / "b.sqlite", steps=8)
    target = tmp_path / "all.sqlite"
    if against == "target":
        merge(target, [other])
    before = contents(target) if target.exists() else (0, 0, [])
    with pytest.raises(StoreError) as refused:
        merge(target, [first] if against == "target" else [first, other])
    message = str(refused.value)
    assert "under another protocol" in message and ("steps 8 -> 4" in message or "steps 4 -> 8" in message)
    assert "nothing was merged" in message and "merge only databases of one protocol" in message
    assert "--fresh" not in message and "--db" not in message
    assert contents(target) == before


def test_a_killed_writers_staging_folder_is_removed_and_a_running_ones_kept(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    database(tmp_path / "a.sqlite")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    partial = tmp_path / "a.samples" / ".partial"
    killed, running = partial / f"{host}-{finished.stdout.strip()}-x1", partial / f"{host}-{os.getpid()}-x2"
    for folder in (killed, running):
        folder.mkdir(parents=True)
        (folder / "sample.png").write_bytes(b"half-written")
    ResultStore(tmp_path / "a.sqlite").close()
    assert not killed.exists() and (running / "sample.png").is_file()
