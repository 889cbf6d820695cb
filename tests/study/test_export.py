"""`study export`: every row its own file, and the folder holds exactly what its index lists."""

from __future__ import annotations

import csv

import pytest
import torch

from cachekit.study.export import ExportError, export
from cachekit.study.store import ResultStore

LONG_LABEL = "teacache rel_l1_thresh=0.25 " + "x" * 80  # two settings whose labels share their first 80 characters
LONG_PROMPT = "a photograph of " + "a very long prompt " * 12  # two prompts sharing their first 200 bytes


def database(path):
    store = ResultStore(path)
    store.record_run("s", {"seeds": [0]}, 8, {})
    settings = [("uncached", "uncached"), ("{}", LONG_LABEL + " a"), ('{"b": 1}', LONG_LABEL + " b")]
    for value, (setting, label) in enumerate(settings):
        for number, condition in enumerate([LONG_PROMPT + "cat", LONG_PROMPT + "dog", "短い" * 60 + "猫"]):
            row = {
                "study": "s",
                "model": "org/flux",
                "setting": setting,
                "seed": 0,
                "condition": condition,
                "label": label,
                "strategy": "x",
                "latency_s": 1.0,
            }
            store.add(row, torch.full((1, 3, 4, 4), value / 3 + number / 10))
    store.close()
    return path


def indexed(out):
    with (out / "index.csv").open() as file:
        return [line["file"] for line in csv.DictReader(file)]


def test_each_row_exports_to_its_own_file_and_the_folder_holds_only_the_index(tmp_path):
    out = tmp_path / "export"
    export(database(tmp_path / "r.sqlite"), out)
    files = indexed(out)
    assert len(files) == len(set(files)) == 9
    on_disk = {str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()}
    assert on_disk == {*files, "index.csv"}
    assert all(len(part.encode()) <= 255 for name in files for part in name.split("/"))
    samples = {name: (out / name).read_bytes() for name in files}
    assert len(set(samples.values())) == 9  # no file stands for two rows


def test_an_earlier_export_is_refused_then_replaced_with_overwrite(tmp_path):
    db = database(tmp_path / "r.sqlite")
    out = tmp_path / "export"
    export(db, out)
    (out / "flux" / "stale-0.png").write_bytes(b"an earlier export's file")
    with pytest.raises(ExportError, match=r"export is not empty \(it holds flux, index\.csv\).*give --overwrite"):
        export(db, out)
    export(db, out, overwrite=True)
    on_disk = {str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()}
    assert on_disk == {*indexed(out), "index.csv"}


def test_overwrite_clears_only_an_earlier_export_and_out_must_be_a_folder(tmp_path):
    db = database(tmp_path / "r.sqlite")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(ExportError, match=r"holds files but no index\.csv, so it is not an earlier export"):
        export(db, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
    with pytest.raises(ExportError, match=r"--out .*thesis\.tex is a file: give a folder"):
        export(db, tmp_path / "mine" / "thesis.tex")
    with pytest.raises(ExportError, match=r"cannot export into .*thesis\.tex/out: .*; give a folder you can write"):
        export(db, tmp_path / "mine" / "thesis.tex" / "out")
