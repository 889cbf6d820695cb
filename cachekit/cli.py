"""The `cachekit` command: list what is installed, run studies, write their reports."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cachekit.schemas.calibration import CalibrationSpec

DEFAULT_RESULTS = Path("cachekit-results")


def _json_strategy(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f'not valid JSON ({error}): give e.g. \'{{"strategy": "uniform"}}\'') from None
    if not isinstance(value, dict) or "strategy" not in value:
        raise argparse.ArgumentTypeError("give a JSON object with a 'strategy' key, e.g. '{\"strategy\": \"uniform\"}'")
    return value


def _strategy(text: str) -> Any:
    """A strategy as `cachekit.apply` takes it: a JSON object, a config file or a name."""
    if text.lstrip().startswith("{"):
        return _json_strategy(text)
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"give a whole number of threads, 1 or more, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    """Run a command; a mistake in what the user asked for is one line on stderr (exit code 2),
    not a traceback."""
    from cachekit.errors import CachekitError

    try:
        _main(argv)
    except (CachekitError, ValueError, LookupError, TypeError, FileNotFoundError) as error:
        message = str(error).strip().replace("\n", "; ")
        print(f"cachekit: error: {message}", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    """The command line: its commands and their options."""
    parser = argparse.ArgumentParser(prog="cachekit", description="Training-free caching for diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the installed strategies, estimators, adapters, metrics and presets")

    study = commands.add_parser("study", help="compare cache strategies").add_subparsers(dest="action", required=True)
    run = study.add_parser("run", help="run a study spec (resumes unless --fresh)")
    run.add_argument("spec", help="a .toml/.json study spec, or 'default'")
    run.add_argument("--db", type=Path, help=f"results database (default: {DEFAULT_RESULTS}/<study>.sqlite)")
    run.add_argument("--fresh", action="store_true", help="recompute every cell")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--report", action="store_true", help="write the report when done")
    run.add_argument(
        "--db-per-process",
        action="store_true",
        help="under torchrun: each process writes its own database beside --db, merged into it at the end "
        "(for file systems where SQLite's locking is unreliable)",
    )
    merge = study.add_parser("merge", help="gather the cells of several results databases into one")
    merge.add_argument("db", type=Path, help="the database to merge into (made if missing)")
    merge.add_argument("sources", type=Path, nargs="+", help="databases to take cells from")
    laid_out = study.add_parser("export", help="lay the samples out per setting, as VBench and other tools read them")
    laid_out.add_argument("db", type=Path)
    laid_out.add_argument("--out", type=Path, help="folder (default: beside the database, <db>-export)")
    laid_out.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    laid_out.add_argument("--study", help="which study in the database (default: the latest)")
    report = study.add_parser("report", help="write the Markdown report of a results database")
    report.add_argument("db", type=Path)
    report.add_argument("--out", type=Path, help="folder (default: beside the database)")
    report.add_argument("--study", help="which study in the database (default: the latest)")

    one = commands.add_parser(
        "generate", help="one generation under a strategy beside the uncached one: the summary, speedup and PSNR"
    )
    one.add_argument("model", help="a testbed name, a diffusers pipeline folder or a hub id")
    one.add_argument(
        "--strategy",
        required=True,
        type=_strategy,
        help='a strategy name, a JSON config (\'{"strategy": "uniform", "interval": 3}\') or a .json/.toml file',
    )
    condition = one.add_mutually_exclusive_group(required=True)
    condition.add_argument("--prompt", help="what a diffusers pipeline generates")
    condition.add_argument("--label", type=int, help="the digit a testbed model generates")
    one.add_argument("--out", type=Path, help="where the cached output goes (.png for images, .mp4 for videos)")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--steps", type=int, default=50)
    one.add_argument("--negative-prompt")
    one.add_argument("--guidance-scale", type=float)
    one.add_argument("--true-cfg-scale", type=float)
    one.add_argument("--height", type=int)
    one.add_argument("--width", type=int)
    one.add_argument("--frames", type=int, help="a video pipeline's num_frames")
    one.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    one.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    one.add_argument("--warmup", type=int, default=1, help="untimed uncached generations first (default 1)")

    calibrate = commands.add_parser("calibrate", help="fit TeaCache's rescale polynomial to a model")
    calibrate.add_argument("spec", type=Path, help="a .toml/.json calibration spec")
    calibrate.add_argument("--out", type=Path, help="the preset file (default: <model>-calibrated.json)")
    calibrate.add_argument("--plot", type=Path, help="the fit's PNG (default: beside the preset)")
    tune = commands.add_parser("tune", help="search a strategy's main knob on the spec's held-out seeds")
    tune.add_argument("spec", type=Path, help="a .toml/.json calibration spec")
    tune.add_argument(
        "--strategy",
        required=True,
        type=_json_strategy,
        help='a strategy config as JSON, e.g. \'{"strategy": "uniform"}\'',
    )
    target = tune.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float, help="the share of block executions to spend, as closely as it can")
    target.add_argument(
        "--budget", type=float, help="the most block executions to spend (a share, 0-1): the best quality within it"
    )
    target.add_argument(
        "--quality",
        type=float,
        help="the bound on the spec's primary metric against the uncached output: at least this PSNR (dB), at "
        "most this LPIPS",
    )
    tune.add_argument(
        "--write",
        action="store_true",
        help="store the chosen threshold in the calibrated preset file, so TeaCacheConfig(preset=...) uses it",
    )
    tune.add_argument(
        "--save",
        type=Path,
        help="with --budget: add the chosen setting to this file, which a config's `tuned` names, so that "
        '{"strategy": ..., "budget": B, "tuned": FILE} takes it on this model at this step count',
    )
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    calibrate.add_argument("--quiet", action="store_true", help="no progress bar")
    for command in (run, calibrate, tune, one):
        command.add_argument(
            "--threads",
            type=_positive,
            help="CPU threads torch computes with (overrides the spec's `threads`; unset there: 1 for the testbed "
            "models, torch's default for pipelines)",
        )

    return parser


def _main(argv: list[str] | None) -> None:
    args = parser().parse_args(argv)
    if args.command == "list":
        _list()
    elif args.command == "generate":
        _generate(args)
    elif args.command == "calibrate":
        _calibrate(args)
    elif args.command == "tune":
        _tune(args)
    elif args.action == "run":
        _run(args)
    elif args.action == "merge":
        _merge(args)
    elif args.action == "export":
        from cachekit.study.export import export

        out = args.out or args.db.with_name(f"{args.db.stem}-export")
        print(f"samples: {out} (index: {export(args.db, out, args.study, args.overwrite)})")
    else:
        from cachekit.study import write_report

        print(f"report: {write_report(args.db, args.out, args.study)}")


def _list() -> None:
    import cachekit
    from cachekit.schemas.diffusers_methods import DIFFUSERS_METHODS
    from cachekit.schemas.magcache import magcache_presets
    from cachekit.schemas.teacache import teacache_presets

    print("strategies:", ", ".join(cachekit.list_strategies()))
    print("estimators:", ", ".join(cachekit.list_estimators()))
    print("adapters:  ", ", ".join(cachekit.list_adapters()))
    print("metrics:   ", ", ".join(cachekit.list_metrics()))
    print("presets:   ", "teacache:", ", ".join(teacache_presets()), "| magcache:", ", ".join(magcache_presets()))
    print("diffusers methods for studies:", ", ".join(sorted(DIFFUSERS_METHODS)))
    for plugin, reason in cachekit.plugin_errors().items():
        print(f"plugin {plugin!r} failed to load: {reason}")


def _run(args: argparse.Namespace) -> None:
    from cachekit.study import load_spec, plan, run_study, write_report

    spec = load_spec(args.spec)
    if args.threads is not None:
        spec = spec.model_copy(update={"threads": args.threads})
    cells = len(plan(spec).cells)
    db = args.db or DEFAULT_RESULTS / f"{spec.name}.sqlite"
    _say(f"study {spec.name!r}: {cells} cells -> {db}")
    try:
        run_study(spec, db, fresh=args.fresh, progress=not args.quiet, db_per_process=args.db_per_process)
    except KeyboardInterrupt:
        if _first_process():
            print(
                f"\ninterrupted: {_saved(db, spec.name)} of {cells} cells of study {spec.name!r} are saved in {db}; "
                "run the same command again to go on from there (without --fresh)",
                file=sys.stderr,
            )
        sys.exit(130)
    if args.report and _first_process():
        print(f"report: {write_report(db, study=spec.name)}")


def _generate(args: argparse.Namespace) -> None:
    from cachekit.generate import generate, save

    settings = {
        name: value
        for name in (
            "steps",
            "negative_prompt",
            "guidance_scale",
            "true_cfg_scale",
            "height",
            "width",
            "frames",
            "device",
            "dtype",
            "threads",
        )
        if (value := getattr(args, name)) is not None
    }
    condition = args.prompt if args.prompt is not None else str(args.label)
    result = generate(args.model, args.strategy, condition, seed=args.seed, warmup=args.warmup, **settings)
    print(result.report())
    if args.out is not None:
        print(f"saved: {save(result.output, args.out)}")


def _saved(db: Path, study: str) -> int:
    from cachekit.study.store import ResultStore, StoreError

    try:
        store = ResultStore(db, create=False)
    except StoreError:
        return 0
    try:
        return len(store.finished(study))
    finally:
        store.close()


def _merge(args: argparse.Namespace) -> None:
    from cachekit.study import merge

    for source, merged in merge(args.db, args.sources).items():
        print(f"{source}: {merged.added} cells added, {merged.duplicates} already in {args.db}")


def _first_process() -> bool:
    """Under torchrun, only the first process speaks for all."""
    return os.environ.get("RANK", "0") == "0"


def _say(message: str) -> None:
    if _first_process():
        print(message)


def _calibration_spec(path: Path, threads: int | None) -> CalibrationSpec:
    """The spec, checked before any model loads, with torch's threads set for it."""
    from cachekit.schemas.calibration import CalibrationSpec
    from cachekit.schemas.files import read_table
    from cachekit.study.plan import check_device, check_model
    from cachekit.study.workers import use_threads

    spec = CalibrationSpec.model_validate(read_table(path))
    if threads is not None:
        spec = spec.model_copy(update={"threads": threads})
    check_model(spec.model, spec, "model")
    check_device(spec.device)
    use_threads(spec, [spec.model])
    return spec


def _calibrate(args: argparse.Namespace) -> None:
    from cachekit.calibrate import CalibrationWarning, calibrate, plot, write_preset

    spec = _calibration_spec(args.spec, args.threads)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", CalibrationWarning)
        result = calibrate(spec, progress=not args.quiet)
    if not _first_process():
        return
    for warning in warned:
        print(f"warning: {warning.message}", file=sys.stderr)
    preset = write_preset(result, args.out or Path(f"{spec.preset_name()}.json"))
    figure = plot(result, args.plot or preset.with_suffix(".png"))
    strategy = json.dumps({"strategy": "teacache", "preset": str(preset)})
    print(f"coefficients {list(result.fit.coefficients)}")
    print(f"fit: RMSE {result.fit.rmse:.5f}, R2 {result.fit.r2:.3f}, {result.fit.samples} calls")
    print(f"preset: {preset}\nplot: {figure}")
    print(
        f"next: find its threshold and store it in the preset:\n  cachekit tune {args.spec} --strategy '{strategy}' "
        f"--ratio 0.4 --write\nthen use TeaCacheConfig(preset={str(preset)!r}) (or give rel_l1_thresh yourself)"
    )


def _tune(args: argparse.Namespace) -> None:
    from cachekit.budget import save as save_budget
    from cachekit.study.models import load_model
    from cachekit.tune import Tuner, check_target, preset_file, tuned_setting, write_threshold

    if args.save is not None and args.budget is None:
        raise ValueError("--save stores the setting chosen for a budget: give --budget too")
    if args.save is not None and str(args.strategy.get("strategy")).startswith("diffusers."):
        raise ValueError(
            "--save stores a setting cachekit.apply takes; one of diffusers' methods is tuned for a budget here "
            "(the setting is printed) or in a study (a budget entry)"
        )
    spec = _calibration_spec(args.spec, args.threads)
    base = args.strategy
    check_target(base, ratio=args.ratio if args.budget is None else args.budget)  # before any model loads
    if args.write:
        preset_file(base)
    model = load_model(spec.model, spec)
    tuner = Tuner(model, base, spec.held_out_seeds, spec.conditions(), not args.quiet, spec.primary)
    if args.budget is not None:
        result = tuner.to_budget(args.budget)
        if args.save is not None:
            print(f"saved to {save_budget(args.save, tuned_setting(model, base, result, args.budget))}")
    elif args.ratio is not None:
        result = tuner.to_ratio(args.ratio)
    else:
        result = tuner.to_quality(args.quality)
    for trial in result.trials:
        figures = f"computed {trial.computed:.1%}, {result.metric} {trial.quality:.4g}"
        print(f"  {result.knob.show(trial.value)}: {figures}")
    chosen = result.chosen
    print(
        f"chosen {json.dumps(result.config(base))}: computed {chosen.computed:.1%} "
        f"({chosen.computed_steps:.1f} of {spec.steps} steps), {result.metric} {chosen.quality:.4g} on held-out seeds"
    )
    if not result.met:
        print(f"warning: the target was not met; the setting above is the closest found ({result.missed})")
    if args.write and result.met:
        target = (
            f"a budget of {args.budget:.0%} of block executions"
            if args.budget is not None
            else f"a computed share of {args.ratio}"
            if args.ratio is not None
            else f"{spec.primary} bounded by {args.quality}"
        )
        written = write_threshold(base, result, target)
        print(
            f"written to {written}: TeaCacheConfig(preset={str(written)!r}) now takes rel_l1_thresh {chosen.value:.5g}"
        )
    elif args.write:
        print("nothing written: the target was not met")


def _version() -> str:
    try:
        return importlib.metadata.version("dit-cachekit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    main()
