"""A study's report: what was asked and where it ran, the table (one row per model x strategy
setting), per model the best quality each method reaches within each budget of block executions
(and of attention calls), the quality-vs-work and speed-vs-quality frontiers, and a timeline of
which steps each strategy computed.

Wall clock is the axis people want and the one that lies on a busy machine, so the report keeps
the noise-free axes beside it (share of block executions, FLOPs saved), gives every latency's
spread, takes a setting's speedup as the ratio of median latencies, and flags a speedup above
what its skipped work allows. The speed-vs-quality plot uses wall clock only where it can be trusted,
and says which axis it shows.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachekit.schemas.diffusers_methods import DIFFUSERS_METHODS
from cachekit.schemas.study import StudySpec
from cachekit.study.intervals import Interval, bootstrap, paired_difference
from cachekit.study.metrics import DEFAULT_PRIMARY
from cachekit.study.store import UNCACHED, read_study

#: Shares of the uncached work at which the report compares methods.
BUDGETS = tuple(StudySpec.model_fields["budgets"].default)
#: Wall clock is trusted when, for every setting, the slower quarter of its timed generations is
#: within this factor of the faster quarter (and no speedup is above its compute limit).
TRUSTED_SPREAD = 1.25
#: The metrics every report shows, in this order; others follow by name.
SHOWN_FIRST = ("psnr", "ssim", "ms_ssim")


@dataclass(frozen=True)
class Summary:
    """One model x strategy setting, over its seeds and conditions."""

    model: str
    setting: str  # the setting's key
    label: str  # unique within the model
    method: str
    cells: int
    latency_s: float  # median of every timed generation of its cells
    latency_min_s: float
    latency_max_s: float
    speedup: float  # the uncached cells' median latency over this setting's
    flops_speedup: float  # uncached FLOPs over FLOPs spent: the speedup free of timing noise
    spread: float  # how much its timed generations vary (`latency_spread`)
    computed: float | None  # share of transformer calls that ran the residual span (None: not known)
    blocks: float  # share of block executions, counted from the outside
    attention_computed: float | None  # share of attention calls computed
    flops_saved: float  # share of the uncached FLOPs not spent
    metrics: dict[str, float | None] = field(default_factory=dict)  # mean over cells; PSNR inf for the reference
    primary: str = DEFAULT_PRIMARY  # the metric methods are ranked by
    higher: bool = True  # whether higher values of it are better
    diffusers: bool = False  # one of diffusers' methods, run as a baseline
    samples: dict[tuple[int, str], float] = field(default_factory=dict)  # the primary metric per (seed, condition)
    shares: dict[tuple[int, str], float] = field(default_factory=dict)  # share of block executions per cell
    speedups: dict[tuple[int, str], float] = field(default_factory=dict)  # per cell, against its uncached cell

    @property
    def interval(self) -> Interval | None:
        """The primary metric's mean over samples with its 95% bootstrap interval (None for the reference)."""
        return None if self.setting == UNCACHED else bootstrap(list(self.samples.values()))

    @property
    def worst(self) -> float | None:
        """The primary metric of its worst sample (None where every sample matched exactly)."""
        finite = [value for value in self.samples.values() if math.isfinite(value)]
        if self.setting == UNCACHED or not finite:
            return None
        return min(finite) if self.higher else max(finite)

    @property
    def quality(self) -> float | None:
        """The primary metric's mean (None for the uncached reference: it is what others are scored against)."""
        return None if self.setting == UNCACHED else self.metrics.get(self.primary)

    @property
    def rank(self) -> float:
        """The primary metric turned so that larger is better."""
        quality = self.quality
        if quality is None:
            return -math.inf
        return quality if self.higher else -quality

    @property
    def compute_limit(self) -> float:
        """The most its skipped work could explain: 1 / the smallest of its shares of FLOPs spent,
        blocks executed and attention calls computed (as if that share were all the time spent),
        so a speedup above it is timing noise whatever the model's time goes to."""
        shares = [1 / self.flops_speedup, self.blocks, self.attention_computed or 1.0]
        smallest = min(shares)
        return 1 / smallest if smallest > 0 else math.inf

    @property
    def above_limit(self) -> bool:
        """A speedup no reuse can give: timing noise (a loaded machine, too few repeats)."""
        return self.speedup > self.compute_limit * (1 + 1e-9)  # at the limit exactly is no anomaly


def latency_spread(latencies: list[float]) -> float:
    """How much timed generations vary: the upper quartile over the lower (slowest over fastest
    for fewer than 4), so one disturbed generation among many does not condemn the rest."""
    low, high = statistics.quantiles(latencies, n=4)[::2] if len(latencies) >= 4 else (min(latencies), max(latencies))
    return high / low if low > 0 else math.inf


def summarize(rows: list[dict[str, Any]], primary: str = DEFAULT_PRIMARY) -> list[Summary]:
    """One summary per model x setting, ranked by `primary` in its own direction."""
    higher = better(primary) == "higher"
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["setting"]), []).append(row)
    labels: dict[tuple[str, str], int] = {}
    summaries = []
    for (model, setting), group in groups.items():
        latencies = [latency for r in group for latency in r["latencies"]]
        uncached = [latency for r in groups.get((model, UNCACHED), []) for latency in r["latencies"]] or latencies
        attention = sum(r["attention_computed"] + r["attention_reused"] for r in group)
        known = [r for r in group if r["computed_calls"] is not None]
        label = group[0]["label"]
        labels[(model, label)] = seen = labels.get((model, label), 0) + 1
        spent, total = sum(r["flops"] for r in group), sum(r["flops"] + r["flops_saved"] for r in group)
        names = dict.fromkeys(name for r in group for name in r["metrics"])
        summaries.append(
            Summary(
                model=model,
                setting=setting,
                label=label if seen == 1 else f"{label} #{seen}",  # settings of an earlier spec, same label
                method=group[0]["method"] or group[0]["strategy"],
                cells=len(group),
                latency_s=statistics.median(latencies),
                latency_min_s=min(latencies),
                latency_max_s=max(latencies),
                speedup=statistics.median(uncached) / statistics.median(latencies),
                flops_speedup=total / spent if spent > 0 else math.inf,
                spread=latency_spread(latencies),
                computed=sum(r["computed_calls"] for r in known) / sum(r["calls"] for r in known) if known else None,
                blocks=sum(r["block_executions"] for r in group)
                / sum(r["block_executions"] / r["block_share"] for r in group),
                attention_computed=sum(r["attention_computed"] for r in group) / attention if attention else None,
                flops_saved=1 - spent / total if total > 0 else 0.0,
                metrics={name: _mean([r["metrics"].get(name) for r in group]) for name in names},
                primary=primary,
                higher=higher,
                diffusers=group[0]["strategy"] in DIFFUSERS_METHODS,
                samples={
                    (r["seed"], r["condition"]): r["metrics"][primary]
                    for r in group
                    if r["metrics"].get(primary) is not None
                },
                shares={(r["seed"], r["condition"]): r["block_share"] for r in group},
                speedups=_cell_speedups(group, groups.get((model, UNCACHED), [])),
            )
        )
    return summaries


def _cell_speedups(group: list[dict[str, Any]], uncached: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """Each cell's speedup: its uncached cell's median latency over its own (same seed and condition)."""
    reference = {(r["seed"], r["condition"]): statistics.median(r["latencies"]) for r in uncached}
    return {
        (r["seed"], r["condition"]): reference[(r["seed"], r["condition"])] / statistics.median(r["latencies"])
        for r in group
        if (r["seed"], r["condition"]) in reference and statistics.median(r["latencies"]) > 0
    }


def held_out(
    rows: list[dict[str, Any]], calibration: set[int], primary: str = DEFAULT_PRIMARY
) -> tuple[list[Summary], list[Summary] | None]:
    """The summaries of the cells scored (all but the `calibration` seeds') and of the calibration
    cells settings are chosen on (None without calibration seeds)."""
    scored = summarize([row for row in rows if row["seed"] not in calibration], primary)
    return scored, summarize([row for row in rows if row["seed"] in calibration], primary) if calibration else None


def wall_clock_trusted(summaries: list[Summary]) -> tuple[bool, str]:
    """Whether the measured speedups can be plotted as they are, and why not."""
    above = [s.label for s in summaries if s.above_limit]
    if above:
        shown = ", ".join(above[:3]) + (f", and {len(above) - 3} more" if len(above) > 3 else "")
        return False, f"{len(above)} speedups above what their skipped work allows ({shown})"
    varied = max(summaries, key=lambda s: s.spread, default=None)
    if varied is not None and varied.spread > TRUSTED_SPREAD:
        return False, f"the timed generations of {varied.label} vary {varied.spread:.2f}x (upper over lower quartile)"
    return True, ""


def better(metric: str) -> str:
    """Which values of `metric` are better: the installed metric's own direction ("higher" for a
    metric no longer installed)."""
    from cachekit.registry import registry

    found = registry().metrics.get(metric)
    return found.better if found is not None else "higher"


def best_within(summaries: list[Summary], share: Any, budget: float) -> Summary | None:
    """The setting of best primary metric among `summaries` whose `share(s)` is within `budget`."""
    fitting = [s for s in summaries if s.quality is not None and (value := share(s)) is not None and value <= budget]
    return max(fitting, key=lambda s: s.rank, default=None)


def budget_tables(
    summaries: list[Summary], budgets: tuple[float, ...] = BUDGETS, chosen_on: list[Summary] | None = None
) -> list[str]:
    """Per model, the best mean PSNR each method reaches within each budget of block executions,
    the winner of each budget marked; the same for attention calls, for the methods that skip
    attention without skipping whole blocks. With `chosen_on` (the same settings on calibration
    seeds), each method's setting is chosen there and scored on `summaries` (held out), its
    held-out spending shown where it overspent."""
    held_out = {(s.model, s.setting): s for s in summaries}
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
        for summary in chosen_on if chosen_on is not None else summaries:
            scored = held_out.get((summary.model, summary.setting))
            if summary.model == model and summary.quality not in (None, math.inf) and scored is not None:
                methods.setdefault(summary.method, []).append(summary)
        for axis, share, belongs in axes:
            chosen = {method: group for method, group in methods.items() if belongs(group)}
            if not chosen:
                continue
            best = {
                (method, budget): _scored(best_within(group, share, budget), held_out)
                for method, group in chosen.items()
                for budget in budgets
            }
            winners = {
                budget: max(
                    (method for method in chosen if best[(method, budget)] is not None),
                    key=lambda method: best[(method, budget)].rank,  # type: ignore[union-attr]
                    default=None,
                )
                for budget in budgets
            }
            if not any(winners.values()):  # no setting fits any budget: nothing to compare
                continue
            how = ", chosen on calibration seeds, scored on held-out seeds" if chosen_on is not None else ""
            lines += [
                f"### {model}: best {metric_name(summaries[0].primary)} within a share of {axis}{how}",
                "",
                "| method | " + " | ".join(f"≤ {budget:.0%}" for budget in budgets) + " |",
                "|---|" + "---|" * len(budgets),
            ]
            for method in chosen:
                cells = []
                for budget in budgets:
                    found = best[(method, budget)]
                    text = "—" if found is None else _figure(found.primary, found.quality)
                    text = f"**{text}**" if winners[budget] == method else text
                    spent = share(found) if found is not None else None
                    over = f" (spent {spent:.1%})" if spent is not None and spent > budget + 0.01 else ""
                    cells.append(text + _bounds(found) + over)
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            verdicts = [_verdict(budget, winners[budget], best, chosen) for budget in budgets]
            lines += ["", "Winner: " + "; ".join(verdicts) + ".", ""]
    return lines


def _scored(chosen: Summary | None, held_out: dict[tuple[str, str], Summary]) -> Summary | None:
    """The held-out figures of a setting chosen elsewhere (itself where it was chosen in place)."""
    return None if chosen is None else held_out.get((chosen.model, chosen.setting))


def _spread(interval: Interval | None, form: str) -> str:
    """An interval as `[low, high]`, or "-" where there is none to give (one cell)."""
    if interval is None or interval.samples < 2:
        return "-"
    return f"[{form.format(interval.low)}, {form.format(interval.high)}]"


def _bounds(summary: Summary | None) -> str:
    """A figure's 95% interval, " [low, high]", where it has one."""
    if summary is None:
        return ""
    text = _spread(summary.interval, f"{{:.{_digits(summary.primary)}f}}")
    return "" if text == "-" else f" {text}"


def _verdict(budget: float, winner: str | None, best: dict[Any, Summary | None], methods: dict[str, Any]) -> str:
    """The winner at `budget` and by how much over the runner-up: the paired difference over the
    samples both scored, with its 95% interval; a tie where the interval holds 0."""
    if winner is None:
        return f"≤ {budget:.0%} —"
    top = best[(winner, budget)]
    others = [best[(method, budget)] for method in methods if method != winner and best[(method, budget)] is not None]
    if top is None or not others:
        return f"≤ {budget:.0%} {winner}"
    runner_up = max(others, key=lambda s: s.rank)  # type: ignore[union-attr]
    assert runner_up is not None
    turned = 1 if top.higher else -1
    difference = paired_difference(
        {key: turned * value for key, value in top.samples.items()},
        {key: turned * value for key, value in runner_up.samples.items()},
    )
    if difference is None or difference.samples < 2:
        return f"≤ {budget:.0%} {winner}"
    digits = _digits(top.primary)
    by = f"{difference.mean:+.{digits}f} [{difference.low:+.{digits}f}, {difference.high:+.{digits}f}]"
    if not difference.excludes_zero:
        return f"≤ {budget:.0%} a tie between {winner} and {runner_up.method} ({by})"
    return f"≤ {budget:.0%} {winner} ({by} over {runner_up.method})"


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def write_report(db: str | Path, out: str | Path | None = None, study: str | None = None) -> Path:
    """Write report.md, pareto.png, quality.png and timeline.png into `out` (default: beside the db)."""
    records = read_study(db, study)
    study, rows, runs, samples = records.name, records.rows, records.runs, records.samples
    out = Path(out) if out is not None else Path(db).with_name(f"{Path(db).stem}-report")
    out.mkdir(parents=True, exist_ok=True)
    primary = runs[-1]["spec"].get("primary", DEFAULT_PRIMARY) if runs else DEFAULT_PRIMARY
    calibration = set(runs[-1]["spec"].get("calibration_seeds") or []) if runs else set()
    budgets = tuple(runs[-1]["spec"].get("budgets") or BUDGETS) if runs else BUDGETS
    summaries, chosen_on = held_out(rows, calibration, primary)
    trusted, why_not = wall_clock_trusted(summaries)
    colours = method_colours(summaries)  # one colour per method in every plot
    _pareto(summaries, out / "pareto.png", trusted, why_not, colours)
    plot_quality(summaries, out / "quality.png", colours, budgets)
    _timeline(rows, summaries, out / "timeline.png")
    metrics = [name for name in SHOWN_FIRST if any(name in s.metrics for s in summaries)]
    metrics += sorted({name for s in summaries for name in s.metrics} - set(metrics))
    notes = sorted({note for row in rows for note in json.loads(row["notes"] or "[]")})
    flagged = [s for s in summaries if s.above_limit]
    lines = [
        f"# Study `{study}`",
        "",
        *_progress(rows, runs),
        f"Samples (PNG/MP4 and tensors) are in `{samples}`; `cachekit study export {Path(db).name}` lays them out "
        "one folder per setting.",
        "",
        "Each row: one model and strategy setting over its seeds and conditions. Latency: the median of every timed "
        "generation, with the fastest and slowest; speedup: the uncached cells' median latency over the setting's "
        "(same seeds, conditions and initial latents); limit: the most its skipped work could give (1 over the "
        "smallest of its shares of FLOPs spent, blocks executed and attention calls computed), which a measured "
        "speedup cannot honestly exceed. Block executions and attention calls are "
        "counted with plain torch hooks for every method alike (a block executes when its attention or MLP runs); "
        "quality is the mean over cells against the uncached output, with the 95% bootstrap interval of the "
        "primary metric's mean over the cells (seeds x conditions) and the worst cell; the share of block "
        "executions and the speedup (each cell's against its uncached cell) have their intervals too. Each "
        "budget's winner is "
        "given with its paired difference to the runner-up over the cells both scored, and its interval: where "
        "that interval holds 0 the budget is a tie.",
        "",
        "| model | strategy | cells | latency (s) [min-max] | speedup | limit | calls computed | blocks executed "
        "| attention computed | FLOPs saved | "
        + " | ".join(_METRIC_NAMES.get(m, m) for m in metrics)
        + f" | {metric_name(primary)} 95% interval | worst sample | blocks 95% interval | speedup 95% interval |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * (len(metrics) + 4),
        *(_table_row(summary, metrics) for summary in summaries),
        "",
        *(
            [
                f"**Timing flag**: {len(flagged)} settings measured faster than their skipped work allows (marked ⚠: "
                + ", ".join(f"{s.model} {s.label} {s.speedup:.2f}x > {s.compute_limit:.2f}x" for s in flagged)
                + "). Wall clock was disturbed (a loaded machine, too few repeats): rerun on an idle machine with "
                "more repeats, and read the block and FLOPs columns meanwhile.",
                "",
            ]
            if flagged
            else []
        ),
        "## Which method wins at each budget",
        "",
        *(
            [
                f"Each method's setting at each budget is chosen on the calibration seeds "
                f"{sorted(calibration)} and scored on the others: the table above and the plots are held-out "
                "figures, and a chosen setting that spent more than its budget held out says what it spent.",
                "",
            ]
            if calibration
            else []
        ),
        *budget_tables(summaries, budgets, chosen_on=chosen_on),
        f"![{metric_name(summaries[0].primary if summaries else DEFAULT_PRIMARY)} vs share of block executions]"
        "(quality.png)",
        "",
        "![speedup vs quality](pareto.png)",
        "",
        "Speedup axis: "
        + (
            "wall clock (ratio of median latencies)."
            if trusted
            else f"FLOPs (uncached FLOPs over FLOPs spent), as wall clock cannot be trusted here: {why_not}."
        ),
        "",
        "![which steps each strategy computed](timeline.png)",
        "",
        *(f"- {note}" for note in notes),
        *_asked_and_where(runs),
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


_METRIC_NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM", "lpips": "LPIPS"}


def metric_name(metric: str) -> str:
    """A metric as the report's headings and axes name it."""
    return _METRIC_NAMES.get(metric, metric)


def _figure(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if value == math.inf:
        return "exact"
    return f"{value:.{_digits(metric)}f}"


def _digits(metric: str) -> int:
    """Decimals a metric's figures are given with: PSNR in dB to 2, the others (0-1 scales) to 4."""
    return 2 if metric == "psnr" else 4


def _progress(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[str]:
    """How many of the planned cells are done."""
    if not runs:
        return [f"{len(rows)} cells.", ""]
    planned = runs[-1]["planned"]
    labels = len({(row["model"], row["label"]) for row in rows})
    done = f"{len(rows)} of {planned} planned cells finished"
    todo = f"; {planned - len(rows)} to go (run the study again to resume)" if len(rows) < planned else ""
    return [f"{done}{todo}; {labels} model x setting pairs.", ""]


def _asked_and_where(runs: list[dict[str, Any]]) -> list[str]:
    """The spec of the latest run, and every environment the cells were measured in."""
    if not runs:
        return []
    environments = list({json.dumps(run["environment"], sort_keys=True): run["environment"] for run in runs}.values())
    lines = [
        "",
        "## What was asked, and where it ran",
        "",
        "```json",
        json.dumps(runs[-1]["spec"], indent=2),
        "```",
        "",
    ]
    keys = list(dict.fromkeys(key for environment in environments for key in environment))
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(e.get(key, "")) for key in keys) + " |" for e in environments]
    started = ", ".join(run["started_at"] for run in runs)
    return [*lines, "", f"Runs started at {started} (UTC)."]


def _table_row(s: Summary, metrics: list[str]) -> str:
    cells = [
        s.model,
        s.label,
        str(s.cells),
        f"{s.latency_s:.4f} [{s.latency_min_s:.4f}-{s.latency_max_s:.4f}]",
        f"{s.speedup:.2f}" + (" ⚠" if s.above_limit else ""),
        "∞" if s.compute_limit == math.inf else f"{s.compute_limit:.2f}",
        "-" if s.computed is None else f"{s.computed:.1%}",
        f"{s.blocks:.1%}",
        "-" if s.attention_computed is None else f"{s.attention_computed:.1%}",
        f"{s.flops_saved:.1%}",
        *(_figure(name, s.metrics.get(name)) for name in metrics),
        _bounds(s).strip() or "-",
        _figure(s.primary, s.worst) if s.worst is not None or s.setting == UNCACHED else "exact",
        _spread(bootstrap(list(s.shares.values())), "{:.1%}"),
        _spread(bootstrap(list(s.speedups.values())), "{:.2f}"),
    ]
    return "| " + " | ".join(cells) + " |"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pareto(summaries: list[Summary], path: Path, trusted: bool, why_not: str, colour: dict[str, Any]) -> None:
    """Speedup vs PSNR per model, one colour per method; the frontier joins the settings no other
    beats on both (drawn from two of them on). The x axis is wall clock where it can be trusted,
    else the FLOPs speedup, and the title says which. Settings that land on one spot (a method and
    its diffusers twin) are drawn as rings around each other and labelled together."""
    plt = _pyplot()
    models = list(dict.fromkeys(s.model for s in summaries))
    figure, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5.5), squeeze=False)
    to_label = []
    for axis, model in zip(axes[0], models, strict=True):
        shown = [s for s in summaries if s.model == model and s.quality is not None and s.quality != math.inf]
        methods = list(dict.fromkeys(s.method for s in shown))
        points = [(s.speedup if trusted else s.flops_speedup, s.quality or 0.0, s) for s in shown]
        axis.scatter([x for x, _, _ in points], [y for _, y, _ in points], s=0)  # sets the limits
        frontier = sorted((x, y) for x, y, _ in points if not any(o[0] >= x and o[1] > y for o in points))
        if len(frontier) > 1:
            axis.plot(*zip(*frontier, strict=True), "k--", linewidth=1, zorder=2)
        axis.axvline(1.0, color="grey", linewidth=0.8)
        axis.margins(x=0.15, y=0.12)
        figure.canvas.draw()
        labelled = []
        for group in _coincident(axis, points):
            _rings(axis, [(x, y, colour[s.method]) for x, y, s in group])
            labelled.append((group[0][0], group[0][1], ", ".join(s.label for _, _, s in group)))
        xlabel = "speedup vs uncached (wall clock, ratio of medians)" if trusted else "speedup in FLOPs vs uncached"
        axis.set(title=model, xlabel=xlabel, ylabel=f"{metric_name(summaries[0].primary)} vs uncached")
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=colour[method]) for method in methods]
        labels = list(methods)
        if len(frontier) > 1:
            handles.append(plt.Line2D([], [], color="k", linestyle="--"))
            labels.append("frontier")
        axis.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8, frameon=False)
        to_label.append((axis, labelled))
    if not trusted:
        figure.suptitle(f"x: FLOPs, not wall clock: {why_not}", fontsize=9)
    figure.tight_layout()
    for axis, labelled in to_label:  # once the layout is final: labels are placed in pixels
        place_labels(figure, axis, labelled)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def _coincident(axis: Any, points: list[tuple[float, float, Any]], pixels: float = 6.0) -> list[list[Any]]:
    """`points` grouped where their markers would cover each other on `axis`."""
    groups: list[list[Any]] = []
    for point in points:
        here = axis.transData.transform(point[:2])
        for group in groups:
            there = axis.transData.transform(group[0][:2])
            if abs(here[0] - there[0]) < pixels and abs(here[1] - there[1]) < pixels:
                group.append(point)
                break
        else:
            groups.append([point])
    return groups


#: Where a point's label may go, in points from the point, tried in order.
_OFFSETS = [(6, 0), (-6, 0), (6, 9), (6, -9), (-6, 9), (-6, -9), (8, 18), (8, -18), (-8, 18), (-8, -18)]


def place_labels(figure: Any, axis: Any, points: list[tuple[float, float, str]]) -> None:
    """Annotate each point with its label inside the axes, where it covers neither another label
    nor another point; a label placed away from its point gets a leader line. Call it once the
    layout is final."""
    renderer = figure.canvas.get_renderer()
    figure.canvas.draw()
    frame = axis.get_window_extent(renderer)
    marks = [axis.transData.transform((x, y)) for x, y, _ in points]
    boxes = [(mx - 6, my - 6, mx + 6, my + 6) for mx, my in marks]
    labels: list[tuple[float, ...]] = []
    order = sorted(range(len(points)), key=lambda i: (-points[i][1], points[i][0]))
    for number, index in enumerate(order):
        x, y, label = points[index]
        others = [box for i, box in enumerate(boxes) if i != index] + labels
        candidates = [*_OFFSETS, *((sign * (14 + 10 * (number % 4)), 30 + 8 * (number % 5)) for sign in (-1, 1))]
        for dx, dy in candidates:
            text = axis.annotate(
                label,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=7,
                ha="left" if dx >= 0 else "right",
                va="center",
                annotation_clip=False,
                arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.6, "shrinkB": 4}
                if (dx, dy) != _OFFSETS[0]
                else None,
            )
            box = text.get_window_extent(renderer)
            edges = (box.x0, box.y0, box.x1, box.y1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if (dx, dy) == candidates[-1] or (inside and not any(_overlap(edges, other) for other in others)):
                labels.append(edges)
                break
            text.remove()


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def plot_quality(
    summaries: list[Summary], path: Path, colour: dict[str, Any] | None = None, budgets: tuple[float, ...] = BUDGETS
) -> None:
    """The primary metric against the share of block executions, one line per method through its settings
    (diffusers' methods dashed); methods that run every block are left to the budget tables.
    Settings of several methods on one spot (a method and its diffusers twin) are drawn as rings
    around each other, so none hides another."""
    plt = _pyplot()
    models = list(dict.fromkeys(s.model for s in summaries))
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    methods = list(dict.fromkeys(s.method for s in summaries if s.quality not in (None, math.inf) and s.blocks < 1))
    peers = {s.method for s in summaries if s.diffusers}
    primary = metric_name(summaries[0].primary) if summaries else "quality"
    colour = colour or method_colours(summaries)
    for axis, model in zip(axes[0], models, strict=True):
        groups: dict[str, list[Summary]] = {}
        for s in summaries:
            if s.model == model and s.quality is not None and s.quality != math.inf:
                groups.setdefault(s.method, []).append(s)
        shown = {method: group for method, group in groups.items() if min(s.blocks for s in group) < 1}
        for method, group in shown.items():
            group.sort(key=lambda s: s.blocks)
            style = "--" if group[0].diffusers else "-"
            axis.plot([s.blocks for s in group], [s.quality for s in group], style, color=colour[method], linewidth=1.2)
        for budget in budgets:
            axis.axvline(budget, color="grey", linewidth=0.5)
        axis.margins(x=0.08, y=0.08)
        axis.set(title=model, xlabel="share of block executions (counted)", ylabel=f"{primary} vs uncached")
        figure.canvas.draw()
        points = [(s.blocks, s.quality or 0.0, s) for group in shown.values() for s in group]
        for spot in _coincident(axis, points):
            _rings(axis, [(x, y, colour[s.method]) for x, y, s in spot])
    handles = [plt.Line2D([], [], color=colour[m], marker="o", linestyle="--" if m in peers else "-") for m in methods]
    figure.legend(handles, methods, loc="lower center", ncol=min(len(methods), 5) or 1, fontsize=8, frameon=False)
    rows = -(-len(methods) // 5)
    figure.tight_layout(rect=(0, 0.05 * rows + 0.02, 1, 1))
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def method_colours(summaries: list[Summary]) -> dict[str, Any]:
    """One colour per method of the study, the same in every plot: the strong ones of tab20 first,
    in the order the methods first appear."""
    palette = _pyplot().get_cmap("tab20").colors
    order = [*palette[0::2], *palette[1::2]]
    methods = dict.fromkeys(s.method for s in summaries)
    return {method: order[number % len(order)] for number, method in enumerate(methods)}


def _rings(axis: Any, spot: list[tuple[float, float, Any]]) -> None:
    """Markers on one spot, the largest first, each smaller one on top of it."""
    for ring, (x, y, colour) in enumerate(spot):
        size = 30 * (1 + 1.2 * (len(spot) - 1 - ring))
        axis.scatter(x, y, s=size, color=colour, zorder=3 + ring, edgecolors="white", linewidths=0.5)


def _timeline(rows: list[dict[str, Any]], summaries: list[Summary], path: Path) -> None:
    """Per model, setting and CFG branch, the share of work computed at each step, over all cells
    (1: every cell computed that step; for module-level strategies, the share of modules)."""
    plt = _pyplot()
    label_of = {(s.model, s.setting): s.label for s in summaries}
    shares: dict[tuple[str, str, str], list[list[float]]] = {}
    for row in rows:
        decisions = json.loads(row["decisions"] or "{}")
        for branch, decided in decisions.items():
            if decided["span"]:
                computed = [float(step) for step in decided["span"]]
            else:
                most = max(decided["modules"] or [0]) or 1
                computed = [count / most for count in decided["modules"]]
            label = label_of[(row["model"], row["setting"])]
            shares.setdefault((row["model"], label, branch), []).append(computed)
    lines = {key: [statistics.fmean(step) for step in zip(*runs, strict=False)] for key, runs in shares.items()}
    models = list(dict.fromkeys(model for model, _, _ in lines))
    heights = [len([key for key in lines if key[0] == model]) for model in models] or [1]
    figure, axes = plt.subplots(
        len(models) or 1,
        1,
        figsize=(10, 1.2 * (len(models) or 1) + 0.3 * sum(heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for axis, model in zip(axes[:, 0], models, strict=False):
        keys = [key for key in lines if key[0] == model]
        branches = {branch for _, _, branch in keys}
        names = [label if len(branches) == 1 else f"{label} [branch {branch}]" for _, label, branch in keys]
        width = max(len(lines[key]) for key in keys)
        image = [lines[key] + [math.nan] * (width - len(lines[key])) for key in keys]
        shown = axis.imshow(image, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
        axis.set_yticks(range(len(names)), names, fontsize=7)
        axis.set(title=f"{model}: share computed per step, over every cell (dark: computed, light: reused)")
        axis.set_xlabel("step")
        axis.xaxis.get_major_locator().set_params(integer=True)
        figure.colorbar(shown, ax=axis, fraction=0.02, pad=0.01)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
