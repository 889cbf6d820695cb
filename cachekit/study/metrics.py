"""Which metrics a study computes: those its spec names (with their options), its primary one
first (what the report ranks by and budgets compare, with the metric's own direction), or every
installed metric that can run here."""

from __future__ import annotations

import inspect
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cachekit import registry as registries
from cachekit.errors import shortened
from cachekit.metric import Metric, MetricError, MetricSkipped, MetricWarning, Sample
from cachekit.study.store import COLUMNS

#: The primary metric where a spec names none.
DEFAULT_PRIMARY = "psnr"


@dataclass
class Metrics:
    """The metrics a study computes, and those it skips with the reason."""

    active: list[Metric]
    skipped: dict[str, str] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)  # metrics that failed on a sample (warned once each)

    def score(self, sample: Sample) -> tuple[dict[str, float | None], list[str]]:
        """Every active metric's value and notes. A metric that skips the sample, fails on it or
        returns no number gets None and a note: the cell (its generation) is kept either way."""
        values: dict[str, float | None] = {}
        notes = [f"{name} skipped: {reason}" for name, reason in self.skipped.items()]
        for metric in self.active:
            values[metric.name] = None
            try:
                value = metric(sample)
            except MetricSkipped as why:
                notes.append(f"{metric.name} skipped: {why}")
                continue
            except Exception as error:  # a plugin's bug must not cost the generation it scores
                notes.append(self._failed(metric.name, f"raised {type(error).__name__}: {error}"))
                continue
            number = _number(value)
            if number is None:
                notes.append(
                    self._failed(
                        metric.name,
                        f"returned {shortened(repr(value), 60)} ({type(value).__name__}); a metric returns a number "
                        "(a float, or a one-element tensor) or raises MetricSkipped",
                    )
                )
                continue
            values[metric.name] = number
        return values, notes

    def _failed(self, name: str, what: str) -> str:
        note = f"metric {name!r} {what}"
        if name not in self.failed:
            self.failed.add(name)
            warnings.warn(
                f"{note}; its value is left empty and the cell kept (later failures are in the cells' notes)",
                MetricWarning,
                stacklevel=3,
            )
        return note


def _number(value: Any) -> float | None:
    """`value` as a float where it is a number (not a bool or a string), else None."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().reshape(()).item()) if value.numel() == 1 else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


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
