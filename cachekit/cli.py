"""The `cachekit` command: list what is installed, run studies, write their reports."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_RESULTS = Path("cachekit-results")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cachekit", description="Training-free caching for diffusion transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the installed strategies, adapters and TeaCache presets")

    study = commands.add_parser("study", help="compare cache policies").add_subparsers(dest="action", required=True)
    run = study.add_parser("run", help="run a study spec (resumes unless --fresh)")
    run.add_argument("spec", help="a .toml/.json study spec, or 'default'")
    run.add_argument("--db", type=Path, help=f"results database (default: {DEFAULT_RESULTS}/<study>.sqlite)")
    run.add_argument("--fresh", action="store_true", help="recompute every cell")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--report", action="store_true", help="write the report when done")
    report = study.add_parser("report", help="write the Markdown report of a results database")
    report.add_argument("db", type=Path)
    report.add_argument("--out", type=Path, help="folder (default: beside the database)")
    report.add_argument("--study", help="which study in the database (default: the latest)")

    args = parser.parse_args(argv)
    if args.command == "list":
        _list()
    elif args.action == "run":
        _run(args)
    else:
        from cachekit.study import write_report

        print(f"report: {write_report(args.db, args.out, args.study)}")


def _list() -> None:
    import cachekit
    from cachekit.schemas import teacache_presets

    print("strategies:", ", ".join(cachekit.list_strategies()))
    print("adapters:  ", ", ".join(cachekit.list_adapters()))
    print("presets:   ", ", ".join(teacache_presets()))
    for plugin, reason in cachekit.plugin_errors().items():
        print(f"plugin {plugin!r} failed to load: {reason}")


def _run(args: argparse.Namespace) -> None:
    from cachekit.study import load_spec, plan, run_study, write_report

    spec = load_spec(args.spec)
    cells = len(plan(spec).cells)
    db = args.db or DEFAULT_RESULTS / f"{spec.name}.sqlite"
    print(f"study {spec.name!r}: {cells} cells -> {db}")
    run_study(spec, db, fresh=args.fresh, progress=not args.quiet)
    if args.report:
        print(f"report: {write_report(db, study=spec.name)}")


if __name__ == "__main__":
    main()
