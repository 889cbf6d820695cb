"""The metric contract: a quality figure of one generated sample, registered through the plugin
hooks like strategies and estimators (`cachekit_register_metrics`).

A metric compares a cached output with the uncached one of the same seed and condition
(`reference = True`: PSNR, SSIM, LPIPS, ...), or scores a sample on its own (CLIP score,
ImageReward, VBench dimensions), the uncached reference included. One that needs a package or
weights this machine lacks says so in `unavailable()`: a study then skips it with that note,
and never makes up a value.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from cachekit.errors import CachekitError

#: The metric every study computes: the report ranks methods by it.
PRIMARY = "psnr"


class MetricError(CachekitError, ValueError):
    """A metric that is not installed, cannot run on this machine, or got options it does not take."""


class MetricSkipped(Exception):
    """Raised by a metric for a sample it cannot score (too small, wrong channels); says why."""


@dataclass(frozen=True)
class Sample:
    """One generated output, as a metric sees it."""

    output: torch.Tensor  # (B, C, H, W) images or (B, C, F, H, W) videos in [-1, 1], on the CPU
    reference: torch.Tensor  # the uncached output of the same seed and condition (itself, for that cell)
    condition: str  # the prompt, or the class label


class Metric:
    """A quality figure. Subclasses set `name`, take their options as keyword arguments, load
    what they need lazily (on the first call), and compute one float per sample."""

    name: ClassVar[str]
    reference: ClassVar[bool] = True  # whether it compares with the uncached output

    def unavailable(self) -> str | None:
        """Why it cannot run on this machine (a package or weights missing), or None."""
        return None

    def __call__(self, sample: Sample) -> float:
        raise NotImplementedError


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


def metrics_for(entries: Sequence[str | dict[str, Any]] | None) -> Metrics:
    """The metrics a spec asks for (names, or tables with a `name` and options), PSNR always
    first. None: every installed metric that can run here, the others skipped with the reason.
    A metric named explicitly must be installed and able to run."""
    from cachekit.registry import registry

    known = registry().metrics
    if entries is None:
        everything = [known[PRIMARY](), *(metric() for name, metric in sorted(known.items()) if name != PRIMARY)]
        why_not = {metric.name: metric.unavailable() for metric in everything}
        active = [metric for metric in everything if why_not[metric.name] is None]
        return Metrics(active, {name: str(why) for name, why in why_not.items() if why is not None})
    chosen: dict[str, Metric] = {PRIMARY: known[PRIMARY]()}
    for entry in entries:
        options = dict(entry) if isinstance(entry, dict) else {"name": entry}
        name = options.pop("name", None)
        if name not in known:
            raise MetricError(f"unknown metric {name!r}; installed metrics: {', '.join(sorted(known))}")
        allowed = [p for p in inspect.signature(known[name]).parameters if p not in ("args", "kwargs")]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no options"
            raise MetricError(f"metric {name!r} {takes}; got {', '.join(unknown)}")
        metric = known[name](**options)
        why = metric.unavailable()
        if why is not None:
            raise MetricError(f"metric {name!r} cannot run on this machine: {why}")
        chosen[name] = metric
    return Metrics(list(chosen.values()))
