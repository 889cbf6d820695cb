"""Which metrics a study computes: those its spec names (with their options), its primary one
first (what the report ranks by and budgets compare, with the metric's own direction), or every
installed metric that can run here."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cachekit import registry as registries
from cachekit.metric import Metric, MetricError, MetricSkipped, Sample
from cachekit.study.store import COLUMNS

#: The primary metric where a spec names none.
DEFAULT_PRIMARY = "psnr"


@dataclass
class Metrics:
    """The metrics a study computes, and those it skips with the reason."""

    active: list[Metric]
    skipped: dict[str, str] = field(default_factory=dict)

    def score(self, sample: Sample) -> tuple[dict[str, float | None], list[str]]:
        """Every active metric's value (None where a metric skipped the sample) and notes."""
        values: dict[str, float | None] = {}
        notes = [f"{name} skipped: {reason}" for name, reason in self.skipped.items()]
        for metric in self.active:
            try:
                values[metric.name] = float(metric(sample))
            except MetricSkipped as why:
                values[metric.name] = None
                notes.append(f"{metric.name} skipped: {why}")
        return values, notes


def metrics_for(entries: Sequence[str | dict[str, Any]] | None, primary: str = DEFAULT_PRIMARY) -> Metrics:
    """The metrics a spec asks for (names, or tables with a `name` and options), the primary one
    always first. None: every installed metric that can run here, the others skipped with the
    reason. A metric named explicitly, and the primary one, must be installed and able to run. A
    metric's values are stored under its name beside the study's columns: a name that is one of
    them cannot be used."""
    known = registries.registry().metrics
    if entries is None:
        others = {name: metric() for name, metric in sorted(known.items()) if name != primary}
        why_not = {name: _why_not(metric) for name, metric in others.items()}
        skipped = {name: why for name, why in why_not.items() if why is not None}
        return Metrics([_metric(primary, {}), *(m for name, m in others.items() if name not in skipped)], skipped)
    chosen: dict[str, Metric] = {primary: _metric(primary, {})}
    for entry in entries:
        options = dict(entry) if isinstance(entry, dict) else {"name": entry}
        name = options.pop("name", None)
        chosen[str(name)] = _metric(name, options)
    return Metrics(list(chosen.values()))


def _why_not(metric: Metric) -> str | None:
    """Why a study cannot compute `metric` here, or None."""
    if metric.name in COLUMNS:
        return "its name is a column of the study results; rename the metric"
    return metric.unavailable()


def _metric(name: Any, options: dict[str, Any]) -> Metric:
    """The installed metric `name` made with `options`, refused by name where it cannot run."""
    known = registries.registry().metrics
    if name not in known:
        raise MetricError(f"unknown metric {name!r}; installed metrics: {', '.join(sorted(known))}")
    allowed = [p for p in inspect.signature(known[name]).parameters if p not in ("args", "kwargs")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"takes {', '.join(allowed)}" if allowed else "takes no options"
        raise MetricError(f"metric {name!r} {takes}; got {', '.join(unknown)}")
    metric = known[name](**options)
    why = _why_not(metric)
    if why is not None:
        raise MetricError(f"metric {name!r} cannot run on this machine: {why}")
    return metric
