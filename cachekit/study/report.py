"""A study's report: the table (one row per model x policy setting), per model the best quality
each method reaches within each budget of block executions (and of attention calls), the
quality-vs-work and speedup-vs-quality frontiers, and a timeline of which steps each policy
computed."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachekit.study.store import ResultStore, StoreError

#: Shares of the uncached work at which the report compares methods.
BUDGETS = (0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class Summary:
    """One model x policy setting, over its seeds and conditions."""

    model: str
    label: str
    method: str
    cells: int
    latency_s: float  # median of the cells' median latencies
    speedup: float  # median of the cells' speedups
    computed: float | None  # share of transformer calls that ran the residual span (None: not known)
    blocks: float  # share of block executions, counted from the outside
    attention_computed: float | None  # share of attention calls computed
    flops_saved: float  # share of the uncached FLOPs not spent
    psnr: float | None  # mean over cells; inf for the reference itself
    ssim: float | None
    ms_ssim: float | None


def summarize(rows: list[dict[str, Any]]) -> list[Summary]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["setting"]), []).append(row)
    summaries = []
    for (model, _), group in groups.items():
        attention = sum(r["attention_computed"] + r["attention_reused"] for r in group)
        known = [r for r in group if r["computed_calls"] is not None]
        summaries.append(
            Summary(
                model=model,
                label=group[0]["label"],
                method=group[0]["method"] or group[0]["strategy"],
                cells=len(group),
                latency_s=statistics.median(r["latency_s"] for r in group),
                speedup=statistics.median(r["speedup"] for r in group),
                computed=sum(r["computed_calls"] for r in known) / sum(r["calls"] for r in known) if known else None,
                blocks=sum(r["block_executions"] for r in group)
                / sum(r["block_executions"] / r["block_share"] for r in group),
                attention_computed=sum(r["attention_computed"] for r in group) / attention if attention else None,
                flops_saved=sum(r["flops_saved"] for r in group) / sum(r["flops"] + r["flops_saved"] for r in group),
                psnr=_mean([r["psnr"] for r in group]),
                ssim=_mean([r["ssim"] for r in group]),
                ms_ssim=_mean([r["ms_ssim"] for r in group]),
            )
        )
    return summaries


def best_within(summaries: list[Summary], share: Any, budget: float) -> Summary | None:
    """The setting of best mean PSNR among `summaries` whose `share(s)` is within `budget`."""
    fitting = [s for s in summaries if s.psnr is not None and (value := share(s)) is not None and value <= budget]
    return max(fitting, key=lambda s: s.psnr or 0.0, default=None)


def budget_tables(summaries: list[Summary], budgets: tuple[float, ...] = BUDGETS) -> list[str]:
    """Per model, the best mean PSNR each method reaches within each budget of block executions,
    the winner of each budget marked; the same for attention calls, for the methods that skip
    attention without skipping whole blocks."""
    lines: list[str] = []
    axes = [
        ("block executions", lambda s: s.blocks, lambda group: min(s.blocks for s in group) < 1),
        (
            "attention calls (methods that run every block)",
            lambda s: s.attention_computed,
            lambda group: min(s.blocks for s in group) == 1 and min(s.attention_computed or 1 for s in group) < 1,
        ),
    ]
    for model in dict.fromkeys(s.model for s in summaries):
        methods: dict[str, list[Summary]] = {}
        for summary in summaries:
            if summary.model == model and summary.psnr not in (None, math.inf):
                methods.setdefault(summary.method, []).append(summary)
        for axis, share, belongs in axes:
            chosen = {method: group for method, group in methods.items() if belongs(group)}
            if not chosen:
                continue
            best = {
                (method, budget): best_within(group, share, budget)
                for method, group in chosen.items()
                for budget in budgets
            }
            winners = {
                budget: max(
                    (method for method in chosen if best[(method, budget)] is not None),
                    key=lambda method: best[(method, budget)].psnr or 0.0,  # type: ignore[union-attr]
                    default=None,
                )
                for budget in budgets
            }
            if not any(winners.values()):  # no setting fits any budget: nothing to compare
                continue
            lines += [
                f"### {model}: best PSNR (dB) within a share of {axis}",
                "",
                "| method | " + " | ".join(f"≤ {budget:.0%}" for budget in budgets) + " |",
                "|---|" + "---|" * len(budgets),
            ]
            for method in chosen:
                cells = []
                for budget in budgets:
                    found = best[(method, budget)]
                    text = "—" if found is None else f"{found.psnr:.2f}"
                    cells.append(f"**{text}**" if winners[budget] == method else text)
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines += ["", "Winner: " + "; ".join(f"≤ {b:.0%} {w or '—'}" for b, w in winners.items()) + ".", ""]
    return lines


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def write_report(db: str | Path, out: str | Path | None = None, study: str | None = None) -> Path:
    """Write report.md, pareto.png and timeline.png into `out` (default: beside the db)."""
    store = ResultStore(db, create=False)
    try:
        studies = store.studies()
        if not studies or (study is not None and study not in studies):
            raise StoreError(f"{db} holds no study {study!r}; it holds: {', '.join(studies) or 'none'}")
        study = study or studies[-1]
        rows = store.rows(study)
    finally:
        store.close()
    out = Path(out) if out is not None else Path(db).with_name(f"{Path(db).stem}-report")
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize(rows)
    _pareto(summaries, out / "pareto.png")
    plot_quality(summaries, out / "quality.png")
    _timeline(rows, out / "timeline.png")
    notes = sorted({note for row in rows for note in json.loads(row["notes"] or "[]")})
    lines = [
        f"# Study `{study}`",
        "",
        f"{len(rows)} cells from `{Path(db).name}`. Each row: one model and policy setting over its seeds and "
        "conditions; latency is the median of the cells' median latencies, speedup the median of the cells' "
        "speedups against the uncached cell of the same seed and condition (same initial latents), quality "
        "the mean over cells against that uncached output. Block executions and attention calls are counted "
        "with plain torch hooks for every method alike (a block executes when its attention or MLP runs).",
        "",
        "| model | policy | cells | latency (s) | speedup | calls computed | blocks executed | attention computed "
        "| FLOPs saved | PSNR (dB) | SSIM | MS-SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_table_row(summary) for summary in summaries),
        "",
        "## Which method wins at each budget",
        "",
        *budget_tables(summaries),
        "![PSNR vs share of block executions](quality.png)",
        "",
        "![speedup vs PSNR](pareto.png)",
        "",
        "![which steps each policy computed](timeline.png)",
        "",
        *(f"- {note}" for note in notes),
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _table_row(s: Summary) -> str:
    cells = [
        s.model,
        s.label,
        str(s.cells),
        f"{s.latency_s:.4f}",
        f"{s.speedup:.2f}",
        "-" if s.computed is None else f"{s.computed:.1%}",
        f"{s.blocks:.1%}",
        "-" if s.attention_computed is None else f"{s.attention_computed:.1%}",
        f"{s.flops_saved:.1%}",
        "exact" if s.psnr == math.inf else "-" if s.psnr is None else f"{s.psnr:.2f}",
        "-" if s.ssim is None else f"{s.ssim:.4f}",
        "-" if s.ms_ssim is None else f"{s.ms_ssim:.4f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pareto(summaries: list[Summary], path: Path) -> None:
    """Speedup vs PSNR per model; the frontier joins the settings no other beats on both."""
    plt = _pyplot()
    models = list(dict.fromkeys(s.model for s in summaries))
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models, strict=True):
        # (speedup, PSNR, label) of every setting compared against the reference
        points = [
            (s.speedup, s.psnr, s.label)
            for s in summaries
            if s.model == model and s.psnr is not None and s.psnr != math.inf
        ]
        for speedup, psnr, label in points:
            axis.scatter(speedup, psnr, s=30)
            axis.annotate(label, (speedup, psnr), fontsize=7, xytext=(4, 2), textcoords="offset points")
        frontier = sorted(p for p in points if not any(o[0] >= p[0] and o[1] > p[1] for o in points))
        axis.plot([p[0] for p in frontier], [p[1] for p in frontier], "k--", linewidth=1, label="frontier")
        axis.axvline(1.0, color="grey", linewidth=0.8)
        axis.set(title=model, xlabel="speedup vs uncached (median)", ylabel="PSNR vs uncached (dB)")
        axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_quality(summaries: list[Summary], path: Path) -> None:
    """PSNR against the share of block executions, one line per method through its settings
    (diffusers' methods dashed); methods that run every block are left to the budget tables."""
    plt = _pyplot()
    models = list(dict.fromkeys(s.model for s in summaries))
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models) + 3, 5), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for axis, model in zip(axes[0], models, strict=True):
        methods: dict[str, list[Summary]] = {}
        for s in summaries:
            if s.model == model and s.psnr is not None and s.psnr != math.inf:
                methods.setdefault(s.method, []).append(s)
        shown = {method: group for method, group in methods.items() if min(s.blocks for s in group) < 1}
        for number, (method, group) in enumerate(shown.items()):
            group.sort(key=lambda s: s.blocks)
            style = "--" if method.startswith("diffusers.") else "-"
            axis.plot(
                [s.blocks for s in group],
                [s.psnr for s in group],
                style,
                color=colours[number % len(colours)],
                marker="o",
                markersize=3,
                label=method,
            )
        for budget in BUDGETS:
            axis.axvline(budget, color="grey", linewidth=0.5)
        axis.set(title=model, xlabel="share of block executions (counted)", ylabel="PSNR vs uncached (dB)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1 - 3 / figure.get_figwidth(), 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _timeline(rows: list[dict[str, Any]], path: Path) -> None:
    """Per model and setting, the share of work computed at each step (first cell, cond branch)."""
    plt = _pyplot()
    first: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        decisions = json.loads(row["decisions"] or "{}").get("0")
        if (row["model"], row["label"]) in first or decisions is None:
            continue
        if decisions["span"]:
            first[(row["model"], row["label"])] = [float(computed) for computed in decisions["span"]]
        else:
            most = max(decisions["modules"]) or 1
            first[(row["model"], row["label"])] = [count / most for count in decisions["modules"]]
    models = list(dict.fromkeys(model for model, _ in first))
    figure, axes = plt.subplots(len(models) or 1, 1, figsize=(10, 1 + 0.4 * max(len(first), 1)), squeeze=False)
    for axis, model in zip(axes[:, 0], models, strict=False):
        labels = [label for m, label in first if m == model]
        image = [first[(model, label)] for label in labels]
        axis.imshow(image, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
        axis.set(title=f"{model}: computed (dark) and reused (light) per step", xlabel="step")
        axis.xaxis.get_major_locator().set_params(integer=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
