"""The quality frontier: cachekit's methods against diffusers' own on the trained testbed models.

Runs `frontier.toml` once per testbed model, the two models in parallel processes of one thread
each, then prints per model the best mean PSNR each method reaches within 20, 30, 40 and 50% of
block executions (counted with plain torch hooks, the same for every method), beside the
figures measured for cache-dit 1.5.3, and writes the reports and one plot of PSNR against the
share of block executions. `nox -s frontier`, or:

    python benchmarks/frontier.py --out frontier-results [--dtype bfloat16]

In bfloat16 (`nox -s frontier -- --dtype bfloat16`), the precision users run, each model's table
comes with its bf16 noise floor: the mean PSNR of its bf16 uncached samples against its float32
ones. Differences between methods above that floor cannot be seen in bf16.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from cachekit.study import write_report
from cachekit.study.intervals import paired_difference
from cachekit.study.report import BUDGETS, best_within, budget_tables, plot_quality, summarize
from cachekit.study.store import ResultStore

HERE = Path(__file__).parent
MODELS = ["flux-digits", "wan-moving-digits"]

#: cache-dit 1.5.3 DBCache + TaylorSeer on the same models, samples and budgets, as measured when
#: this benchmark was specified (None: it cannot reach that budget). Not rerun here: cache-dit is
#: not a dependency.
CACHE_DIT = {
    "flux-digits": {0.3: 44.0, 0.4: 54.2, 0.5: 57.7},
    "wan-moving-digits": {0.2: None, 0.3: None, 0.5: 49.5},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("frontier-results"))
    parser.add_argument("--fresh", action="store_true", help="recompute finished cells")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    running = []
    for model in MODELS:
        spec = args.out / f"frontier-{model}.toml"
        text = (HERE / "frontier.toml").read_text().replace("{model}", model)
        spec.write_text(f'models = ["{model}"]\ndtype = "{args.dtype}"\n' + text)
        command = [sys.executable, "-m", "cachekit", "study", "run", str(spec), "--db", str(_db(args.out, model))]
        log = (args.out / f"frontier-{model}.log").open("w")
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        fresh = ["--fresh"] if args.fresh else []
        # run from the output folder: from the repository root, `-m cachekit` would import the source folder
        process = subprocess.Popen([*command, *fresh], stdout=log, stderr=log, env=environment, cwd=args.out)
        running.append((model, process))
    for model, process in running:
        if process.wait() != 0:
            sys.exit(f"the {model} study failed; see {args.out / f'frontier-{model}.log'}")
    print(f"frontier: both studies in {time.monotonic() - began:.0f} s")

    summaries = []
    for model in MODELS:
        db = _db(args.out, model)
        write_report(db, args.out / f"report-{model}")
        store = ResultStore(db)
        try:
            summaries += summarize(store.rows("frontier"))
        finally:
            store.close()
    print("\n".join(budget_tables(summaries)))
    for model in MODELS:
        if args.dtype == "bfloat16":
            floor = noise_floor(model, spec_of(args.out, model))
            print(f"{model}: bf16 noise floor {floor:.2f} dB (bf16 uncached vs float32 uncached)")
        print(_verdict(model, [s for s in summaries if s.model == model]))
    plot_quality(summaries, args.out / "frontier.png")
    print(f"plot: {args.out / 'frontier.png'}; reports: {args.out}/report-<model>/report.md")


def spec_of(out: Path, model: str) -> dict:
    return tomllib.loads((out / f"frontier-{model}.toml").read_text())


def noise_floor(model: str, spec: dict) -> float:
    """Mean PSNR of the model's bf16 uncached samples against its float32 ones, over the study's
    labels and seeds, from the same initial noise."""
    import torch

    from cachekit import testbed
    from cachekit.metrics.fidelity import psnr

    torch.set_num_threads(1)
    pipes = {dtype: testbed.load(model).to(dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    scores = []
    for label in spec["labels"]:
        for seed in spec["seeds"]:
            noise = pipes[torch.float32].prepare_latents(seed)
            samples = [
                pipe([label], num_inference_steps=spec["steps"], latents=noise.to(dtype)).float()
                for dtype, pipe in pipes.items()
            ]
            scores.append(psnr(samples[1], samples[0]))
    return sum(scores) / len(scores)


def _db(out: Path, model: str) -> Path:
    return out / f"frontier-{model}.sqlite"


def _verdict(model: str, summaries: list) -> str:
    """Per budget: cachekit's best method against the best peer (diffusers' measured, cache-dit's
    figures), with the paired difference to diffusers' best over the samples both scored and its
    95% bootstrap interval: ahead only where that interval is above 0, a tie where it holds 0."""
    lines = [f"{model}: cachekit's best vs the best peer, PSNR (dB) within each share of block executions"]
    ours = [s for s in summaries if not s.diffusers]
    theirs = [s for s in summaries if s.diffusers]
    for budget in BUDGETS:
        best = best_within(ours, lambda s: s.blocks, budget)
        peer = best_within(theirs, lambda s: s.blocks, budget)
        cache_dit = CACHE_DIT[model].get(budget)
        difference = paired_difference(best.samples, peer.samples) if best is not None and peer is not None else None
        beats_cache_dit = cache_dit is None or (best is not None and (best.quality or 0.0) >= cache_dit)
        if best is None and peer is None and cache_dit is None:
            verdict = "no method fits"
        elif best is None:
            verdict = "BEHIND"
        elif difference is not None and not difference.excludes_zero:
            verdict = "a tie with diffusers" if beats_cache_dit else "BEHIND cache-dit"
        elif difference is not None and difference.mean < 0:
            verdict = "BEHIND"
        else:
            verdict = "cachekit ahead" if beats_cache_dit else "BEHIND cache-dit"
        paired = "" if difference is None else f" (paired difference {difference.text()})"
        lines.append(
            f"  <= {budget:.0%}: cachekit {_show(best)}; diffusers {_show(peer)}{paired}; cache-dit "
            f"{'—' if cache_dit is None else f'{cache_dit:.1f}'} -> {verdict}"
        )
    return "\n".join(lines)


def _show(summary: object) -> str:
    return "—" if summary is None else f"{summary.quality:.2f} ({summary.label}, {summary.blocks:.1%})"  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
