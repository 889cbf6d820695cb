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
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

from cachekit.study.samples import IMAGE, VIDEO, model_slug, slug
from cachekit.study.store import read_study


def prompt_name(condition: str) -> str:
    """A prompt as a file name: as written, but for the characters no file name may hold."""
    return condition.replace("/", "_").replace("\0", "")[:200] or "-"


def export(db: str | Path, out: str | Path, study: str | None = None) -> Path:
    """Export the samples of `study` (default: the latest in `db`) into `out`; returns the index."""
    records = read_study(db, study)
    rows, runs, samples = records.rows, records.runs, records.samples
    out = Path(out)
    planned = runs[-1]["spec"]["seeds"] if runs else []
    seeds = [*planned, *sorted({row["seed"] for row in rows} - set(planned))]
    metrics = sorted({name for row in rows for name in row["metrics"]})
    lines = []
    for row in rows:
        media = [name for name in json.loads(row["files"] or "[]") if name.endswith((IMAGE, VIDEO))]
        folder = out / model_slug(row["model"]) / slug(row["label"])
        latencies = row["latencies"]
        timing = [row["latency_s"], min(latencies), max(latencies), row["speedup"], row["block_share"]]
        figures = [row["metrics"].get(metric) for metric in metrics]
        for number, name in enumerate(media):
            position = seeds.index(row["seed"]) * len(media) + number
            target = folder / f"{prompt_name(row['condition'])}-{position}{Path(name).suffix}"
            _place(samples / name, target)
            lines.append(
                [row["model"], row["label"], row["method"], row["seed"], row["condition"], target, *timing, *figures]
            )
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.csv"
    with index.open("w", newline="") as file:
        writer = csv.writer(file)
        timing = ["latency_s", "latency_min_s", "latency_max_s", "speedup", "block_share"]
        writer.writerow(["model", "setting", "method", "seed", "condition", "file", *timing, *metrics])
        writer.writerows([*line[:5], Path(line[5]).relative_to(out), *line[6:]] for line in lines)
    return index


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)
