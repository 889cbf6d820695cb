"""The quality frontier: cachekit's strongest methods against diffusers' own on the trained
testbed models, held out, at 50 steps and at 28 (FLUX.1-dev's default).

Runs `frontier.toml` once per testbed model and step count: one process of one thread per model,
its step counts in turn. Every method's setting at each budget (10-50% of block executions, counted with plain torch
hooks, the same for every method) is chosen on the calibration seeds and scored on the evaluation
seeds. Prints per model and step count the budget tables, then per budget: cachekit's best against
diffusers' best (each the setting best on the calibration seeds among all of its side's methods),
the paired difference over the evaluation samples with its 95% bootstrap interval and the share
spent there; and the schedule search against its static baseline (uniform, the same estimator).
`nox -s frontier`, or:

    python benchmarks/frontier.py --out frontier-results [--dtype bfloat16]

In bfloat16 (`nox -s frontier -- --dtype bfloat16`), each model's table comes with its bf16 noise
floor: the mean PSNR of its bf16 uncached samples against its float32 ones. Differences between
methods above that floor cannot be seen in bf16.

`--branches` runs `branches.toml` instead: on wan-moving-digits (CFG 3 as two calls, 50 steps), the
step-level methods alone against the same with the branch level, at equal block executions, and
per budget the best of each side held out (`nox -s frontier -- --branches`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from cachekit.study import write_report
from cachekit.study.intervals import Interval, paired_difference
from cachekit.study.report import Summary, best_within, budget_tables, held_out, plot_quality
from cachekit.study.store import ResultStore

HERE = Path(__file__).parent
MODELS = ["flux-digits", "wan-moving-digits"]
STEPS = [50, 28]
#: How far ahead of diffusers' best cachekit's best must be, in dB, with its interval above 0.
MARGIN = 1.0
#: How far over a budget the share spent on the evaluation cells may go.
OVERSPEND = 0.01


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("frontier-results"))
    parser.add_argument("--fresh", action="store_true", help="recompute finished cells")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--branches", action="store_true", help="the branch level against the step level alone")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.branches:
        branches(args)
        return
    began = time.monotonic()
    studies = [(model, steps) for model in MODELS for steps in STEPS]
    lanes = [[study for study in studies if study[0] == model] for model in MODELS]  # one per core
    running = []
    while any(lanes) or running:
        for lane in lanes:
            if lane and not any(study[0] == lane[0][0] for study, _ in running):
                model, steps = lane.pop(0)
                running.append(((model, steps), _start(args, model, steps)))
        time.sleep(1)
        for study, process in list(running):
            if process.poll() is not None:
                running.remove((study, process))
                if process.returncode != 0:
                    sys.exit(f"the {study} study failed; see {_path(args.out, *study, '.log')}")
    print(f"frontier: {len(studies)} studies in {time.monotonic() - began:.0f} s")

    everything = []
    for model, steps in studies:
        db = _path(args.out, model, steps, ".sqlite")
        write_report(db, args.out / f"report-{model}-{steps}")
        spec = tomllib.loads(_path(args.out, model, steps, ".toml").read_text())
        store = ResultStore(db)
        try:
            rows = store.rows("frontier")
        finally:
            store.close()
        scored, chosen_on = held_out(rows, set(spec["calibration_seeds"]))
        assert chosen_on is not None  # frontier.toml names calibration seeds
        budgets = tuple(spec["budgets"])
        print(f"\n## {model}, {steps} steps\n")
        print("\n".join(budget_tables(scored, budgets, chosen_on=chosen_on)))
        if args.dtype == "bfloat16":
            print(f"{model}: bf16 noise floor {noise_floor(model, spec):.2f} dB (bf16 uncached vs float32 uncached)")
        print(verdict(f"{model}, {steps} steps", scored, chosen_on, budgets))
        print(schedule_against_uniform(scored, chosen_on, budgets))
        if steps == STEPS[0]:
            everything += scored
    plot_quality(everything, args.out / "frontier.png")
    reports = f"{args.out}/report-<model>-<steps>/report.md"
    print(f"\nplot ({STEPS[0]} steps): {args.out / 'frontier.png'}; reports: {reports}")


def branches(args: argparse.Namespace) -> None:
    """`branches.toml`: its budget tables and, per budget, the step level's best against the best
    with the branch level, held out."""
    began = time.monotonic()
    db = args.out / "branches.sqlite"
    spec_path = HERE / "branches.toml"
    command = [sys.executable, "-m", "cachekit", "study", "run", str(spec_path), "--db", str(db)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with (args.out / "branches.log").open("w") as log:
        fresh = ["--fresh"] if args.fresh else []
        subprocess.run([*command, *fresh], stdout=log, stderr=log, env=environment, cwd=args.out, check=True)
    print(f"branches: {time.monotonic() - began:.0f} s")
    spec = tomllib.loads(spec_path.read_text())
    store = ResultStore(db)
    try:
        rows = store.rows(spec["name"])
    finally:
        store.close()
    scored, chosen_on = held_out(rows, set(spec["calibration_seeds"]))
    assert chosen_on is not None
    budgets = tuple(spec["budgets"])
    print("\n".join(budget_tables(scored, budgets, chosen_on=chosen_on)))
    print(branch_level_against_step_level(scored, chosen_on, budgets))


def uses_branches(summary: Summary) -> bool:
    """Whether a method of `branches.toml` has the branch level (its name says so; FasterCache's own)."""
    return "branches" in summary.method or summary.method.startswith("fastercache")


def branch_level_against_step_level(scored: list[Summary], chosen_on: list[Summary], budgets: tuple[float, ...]) -> str:
    """Per budget: the best method with the branch level against the best without, each chosen on
    the calibration seeds, held out."""
    return head_to_head(
        "with the branch level vs the step level alone, PSNR (dB), chosen on calibration seeds, held out",
        scored,
        chosen_on,
        budgets,
        ("with", uses_branches),
        ("alone", lambda s: not uses_branches(s)),
        lambda d: (
            "one side does not fit" if d is None else "ahead" if d.low > 0 else "a tie" if d.high > 0 else "BEHIND"
        ),
    )


def head_to_head(
    title: str,
    scored: list[Summary],
    chosen_on: list[Summary],
    budgets: tuple[float, ...],
    first: tuple[str, Callable[[Summary], bool]],
    second: tuple[str, Callable[[Summary], bool]],
    outcome: Callable[[Interval | None], str],
) -> str:
    """Per budget: the best of `first`'s side against the best of `second`'s, each chosen on the
    calibration seeds, scored held out, with their paired difference and `outcome`'s word on it."""
    lines = [title]
    for budget in budgets:
        ours = held_out_best(scored, chosen_on, budget, first[1])
        theirs = held_out_best(scored, chosen_on, budget, second[1])
        difference = paired_difference(ours.samples, theirs.samples) if ours and theirs else None
        shown = "" if difference is None else f"; paired difference {difference.text()}"
        lines.append(
            f"  <= {budget:.0%}: {first[0]} {_show(ours)}; {second[0]} {_show(theirs)}{shown} -> {outcome(difference)}"
        )
    return "\n".join(lines)


def _start(args: argparse.Namespace, model: str, steps: int) -> subprocess.Popen:
    spec = _path(args.out, model, steps, ".toml")
    text = (HERE / "frontier.toml").read_text().replace("{model}", model).replace("{steps}", str(steps))
    spec.write_text(f'models = ["{model}"]\ndtype = "{args.dtype}"\n' + text)
    command = [sys.executable, "-m", "cachekit", "study", "run", str(spec), "--db", str(_path(args.out, model, steps))]
    log = _path(args.out, model, steps, ".log").open("w")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # run from the output folder: from the repository root, `-m cachekit` would import the source folder
    fresh = ["--fresh"] if args.fresh else []
    return subprocess.Popen([*command, *fresh], stdout=log, stderr=log, env=environment, cwd=args.out)


def _path(out: Path, model: str, steps: int, suffix: str = ".sqlite") -> Path:
    return out / f"frontier-{model}-{steps}{suffix}"


def held_out_best(
    scored: list[Summary], chosen_on: list[Summary], budget: float, side: object = lambda s: True
) -> Summary | None:
    """The evaluation figures of the setting, among those `side` takes, that scores best on the
    calibration seeds within `budget` of block executions there."""
    chosen = best_within([s for s in chosen_on if side(s)], lambda s: s.blocks, budget)
    return None if chosen is None else next((s for s in scored if s.setting == chosen.setting), None)


def verdict(title: str, scored: list[Summary], chosen_on: list[Summary], budgets: tuple[float, ...]) -> str:
    """Per budget: cachekit's best against diffusers' best, held out; ahead where the paired
    difference is at least `MARGIN` dB with its interval above 0, and the share spent on the
    evaluation cells within `OVERSPEND` of the budget."""
    lines = [f"{title}: cachekit's best vs diffusers' best, PSNR (dB), chosen on calibration seeds, held out"]
    for budget in budgets:
        ours = held_out_best(scored, chosen_on, budget, lambda s: not s.diffusers)
        theirs = held_out_best(scored, chosen_on, budget, lambda s: s.diffusers)
        difference = paired_difference(ours.samples, theirs.samples) if ours and theirs else None
        lines.append(
            f"  <= {budget:.0%}: cachekit {_show(ours)}; diffusers {_show(theirs)}"
            + ("" if difference is None else f"; paired difference {difference.text()}")
            + f" -> {_outcome(ours, theirs, difference, budget)}"
        )
    return "\n".join(lines)


def _outcome(ours: Summary | None, theirs: Summary | None, difference: Interval | None, budget: float) -> str:
    if ours is None:
        return "no cachekit method fits" if theirs is None else "BEHIND (no cachekit method fits)"
    if ours.blocks > budget + OVERSPEND:
        return f"OVERSPENT ({ours.blocks:.1%})"
    if difference is None:
        return "ahead (no diffusers method fits)"
    if difference.low > 0 and difference.mean >= MARGIN:
        return f"ahead by {difference.mean:.1f} dB"
    if difference.low > 0:
        return f"ahead by less than {MARGIN:g} dB"
    return "a tie" if difference.high > 0 else "BEHIND"


def schedule_against_uniform(scored: list[Summary], chosen_on: list[Summary], budgets: tuple[float, ...]) -> str:
    """Per budget: the searched schedule against uniform with the same estimator, held out."""
    return head_to_head(
        "schedule vs uniform (second-order forecast), PSNR (dB), held out",
        scored,
        chosen_on,
        budgets,
        ("schedule", lambda s: s.method == "schedule+taylor2"),
        ("uniform", lambda s: s.method == "uniform+taylor2"),
        lambda d: "uniform cannot spend this little" if d is None else "schedule ahead" if d.low > 0 else "NOT AHEAD",
    )


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


def _show(summary: Summary | None) -> str:
    return "—" if summary is None else f"{summary.quality:.2f} ({summary.label}, spent {summary.blocks:.1%})"


if __name__ == "__main__":
    main()
