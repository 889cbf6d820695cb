"""Lay a study's samples out the way external evaluation tools read them.

    <out>/<model>/<setting>/<prompt>-<i>.mp4     (or .png)
    <out>/index.csv                             one line per file: model, setting, method, seed, prompt,
                                                its cell's latencies (median, min, max), speedup, share
                                                of block executions and quality figures

One folder per model and setting, one file per prompt (or class label) and sample: `i` counts
the study's seeds in order (times the samples per generation, where a pipeline makes several),
so the folder of a setting is what VBench evaluates (`{prompt}-{index}.mp4`) and what LPIPS,
CLIP score or ImageReward scripts take as a folder of images. Files are hard links to the
samples where the file system allows it, else copies.

Names are cut to what a file system takes (labels at 80 characters, prompts at 200 bytes); names
that would then coincide get a short fingerprint of the full text (`<prompt>~1a2b3c4d-0.png`), so
no file stands for two rows. The folder holds exactly what `index.csv` lists: a folder that holds
anything else is refused, or with `overwrite` an earlier export is replaced.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from cachekit.errors import CachekitError
from cachekit.study.samples import IMAGE, VIDEO, model_slug, slug
from cachekit.study.store import read_study

INDEX = "index.csv"


class ExportError(CachekitError, RuntimeError):
    """An export folder that cannot be written as asked."""


def prompt_name(condition: str) -> str:
    """A prompt as a file name: as written, but for the characters no file name may hold, cut at
    200 bytes (file systems count bytes, not characters)."""
    name = condition.replace("/", "_").replace("\0", "")
    return name.encode()[:200].decode(errors="ignore") or "-"


def unique_names(texts: Iterable[str], name: Callable[[str], str]) -> dict[str, str]:
    """Each text's file name: `name(text)`, followed by a fingerprint of the text where two texts
    would otherwise share one."""
    names = {text: name(text) for text in texts}
    counts = collections.Counter(names.values())
    return {
        text: named if counts[named] == 1 else f"{named}~{hashlib.sha1(text.encode()).hexdigest()[:8]}"
        for text, named in names.items()
    }


def export(db: str | Path, out: str | Path, study: str | None = None, overwrite: bool = False) -> Path:
    """Export the samples of `study` (default: the latest in `db`) into `out`; returns the index.
    `out` must be empty or missing; with `overwrite`, an earlier export there is replaced."""
    records = read_study(db, study)
    rows, runs, samples = records.rows, records.runs, records.samples
    out = Path(out)
    _prepare(out, overwrite)
    models = unique_names((row["model"] for row in rows), model_slug)
    labels = {model: unique_names((row["label"] for row in rows if row["model"] == model), slug) for model in models}
    prompts = unique_names((row["condition"] for row in rows), prompt_name)
    planned = runs[-1]["spec"]["seeds"] if runs else []
    seeds = [*planned, *sorted({row["seed"] for row in rows} - set(planned))]
    metrics = sorted({name for row in rows for name in row["metrics"]})
    lines = []
    for row in rows:
        media = [name for name in json.loads(row["files"] or "[]") if name.endswith((IMAGE, VIDEO))]
        folder = out / models[row["model"]] / labels[row["model"]][row["label"]]
        latencies = row["latencies"]
        timing = [row["latency_s"], min(latencies), max(latencies), row["speedup"], row["block_share"]]
        figures = [row["metrics"].get(metric) for metric in metrics]
        for number, name in enumerate(media):
            position = seeds.index(row["seed"]) * len(media) + number
            target = folder / f"{prompts[row['condition']]}-{position}{Path(name).suffix}"
            _place(samples / name, target)
            lines.append(
                [row["model"], row["label"], row["method"], row["seed"], row["condition"], target, *timing, *figures]
            )
    index = out / INDEX
    with index.open("w", newline="") as file:
        writer = csv.writer(file)
        timing = ["latency_s", "latency_min_s", "latency_max_s", "speedup", "block_share"]
        writer.writerow(["model", "setting", "method", "seed", "condition", "file", *timing, *metrics])
        writer.writerows([*line[:5], Path(line[5]).relative_to(out), *line[6:]] for line in lines)
    return index


def _prepare(out: Path, overwrite: bool) -> None:
    """Make `out` an empty folder, or refuse to."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: give a folder (missing or empty) to export into")
    held = sorted(path.name for path in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (f", ... ({len(held)} in all)" if len(held) > 5 else "")
        raise ExportError(
            f"{out} is not empty (it holds {shown}): an export folder must hold only what its {INDEX} lists; "
            "give --overwrite to replace an earlier export there, or another --out"
        )
    if held and not (out / INDEX).is_file():
        raise ExportError(
            f"{out} holds files but no {INDEX}, so it is not an earlier export: --overwrite replaces only an "
            "export; give another --out"
        )
    try:
        if held:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / INDEX).touch()
    except OSError as error:
        raise ExportError(f"cannot export into {out}: {error.strerror or error}; give a folder you can write") from None


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)
