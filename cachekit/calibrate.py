"""Calibration: fit TeaCache's rescale polynomial to any model an adapter supports.

Uncached generations are recorded call by call, per CFG branch: x = relative L1 change of the
probe since the branch's previous call, y = that of the model output. A polynomial fit of y on x
(numpy) gives the coefficients; the preset written carries the model's identity, the fit's error
and the data size, plus per-step output magnitude ratios for magnitude-based policies.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachekit.adapter import Adapter
from cachekit.registry import resolve_adapter
from cachekit.schemas import CalibrationSpec, TeaCachePreset
from cachekit.schemas.teacache import Probe
from cachekit.signals import relative_l1
from cachekit.steps import StepTracker
from cachekit.study.models import StudyModel, load_model


@dataclass
class Recording:
    """Per call after the first of each branch: the step, the branch, x and y."""

    steps: list[int] = field(default_factory=list)
    branches: list[int] = field(default_factory=list)
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    magnitude_ratios: list[float] = field(default_factory=list)  # mean |out_t| / mean |out_t-1|

    def extend(self, other: Recording) -> None:
        for name in ("steps", "branches", "x", "y", "magnitude_ratios"):
            getattr(self, name).extend(getattr(other, name))


def record(model: StudyModel, seed: int, condition: str, probe: Probe = "modulated_input") -> Recording:
    """Run one uncached generation and record every call's probe and output changes."""
    transformer = model.transformer
    adapter = resolve_adapter(transformer)(transformer)
    tracker = StepTracker(None)
    recording = Recording()
    current: dict[str, Any] = {}
    previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        current["step"] = tracker.advance(float(adapter.timestep(args, kwargs).max()))

    def end(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        step = current["step"]
        signal, out = current["signal"], output[0] if isinstance(output, tuple) else output.sample
        if step.branch in previous:
            last_signal, last_out = previous[step.branch]
            recording.steps.append(step.index)
            recording.branches.append(step.branch)
            recording.x.append(relative_l1(signal, last_signal))
            recording.y.append(relative_l1(out, last_out))
            recording.magnitude_ratios.append((out.abs().mean() / last_out.abs().mean()).item())
        previous[step.branch] = (signal, out)

    hooks = [
        transformer.register_forward_pre_hook(begin, with_kwargs=True),
        transformer.register_forward_hook(end, with_kwargs=True),
        _signal_hook(adapter, probe, current),
    ]
    try:
        model.generate(seed, condition)
    finally:
        for hook in hooks:
            hook.remove()
    return recording


def _signal_hook(adapter: Adapter, probe: Probe, current: dict[str, Any]) -> Any:
    if probe == "modulated_input":
        first_block = adapter.span().blocks[0][0]

        def keep_probe(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current["signal"] = adapter.probe(args, kwargs)

        return first_block.register_forward_pre_hook(keep_probe, with_kwargs=True)
    site = adapter.timestep_embedding()
    return site.module.register_forward_hook(lambda _, args, output: current.__setitem__("signal", site.read(output)))


@dataclass(frozen=True)
class Fit:
    coefficients: tuple[float, ...]  # highest power first
    rmse: float
    r2: float
    samples: int


def fit(x: list[float], y: list[float], order: int = 4) -> Fit:
    """Least-squares polynomial y ~ poly(x)."""
    if len(x) <= order:
        raise ValueError(f"a degree-{order} fit needs more than {order} samples, got {len(x)}")
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    coefficients = np.polyfit(xs, ys, order)
    residual = ys - np.polyval(coefficients, xs)
    total = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1 - float((residual**2).sum()) / total if total > 0 else 1.0
    return Fit(tuple(float(c) for c in coefficients), float(np.sqrt((residual**2).mean())), r2, len(x))


@dataclass
class Calibration:
    spec: CalibrationSpec
    identity: str
    recording: Recording
    fit: Fit

    def preset(self) -> TeaCachePreset:
        ratios: dict[int, list[float]] = {}
        for step, ratio in zip(self.recording.steps, self.recording.magnitude_ratios, strict=True):
            ratios.setdefault(step, []).append(ratio)
        return TeaCachePreset(
            name=self.spec.name or f"{self.spec.model}-calibrated",
            adapter=self.identity.split(":")[0],
            auto=False,
            coefficients=self.fit.coefficients,
            probe=self.spec.probe,
            steps=self.spec.steps,
            identity=self.identity,
            fit={"rmse": self.fit.rmse, "r2": self.fit.r2, "samples": self.fit.samples, "order": self.spec.order},
            magnitude_ratios=tuple(statistics.median(ratios[step]) for step in sorted(ratios)),
            notes=f"calibrated on {self.spec.model}, seeds {self.spec.seeds}, {len(self.spec.conditions())} conditions",
        )


def calibrate(spec: CalibrationSpec, model: StudyModel | None = None) -> Calibration:
    """Record every seed x condition of `spec` uncached and fit the polynomial."""
    model = model or load_model(spec.model, spec)
    recording = Recording()
    for seed in spec.seeds:
        for condition in spec.conditions():
            recording.extend(record(model, seed, condition, spec.probe))
    identity = resolve_adapter(model.transformer)(model.transformer).identity()
    return Calibration(spec, identity, recording, fit(recording.x, recording.y, spec.order))


def write_preset(calibration: Calibration, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(calibration.preset().model_dump_json(indent=2) + "\n")
    return path


def plot(calibration: Calibration, path: str | Path) -> Path:
    """x against y with the fitted curve, so a user sees whether the fit is trustworthy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = np.asarray(calibration.recording.x), np.asarray(calibration.recording.y)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    axis.scatter(x, y, c=calibration.recording.steps, cmap="viridis", s=8, label="calls (colour: step)")
    grid = np.linspace(x.min(), x.max(), 200)
    axis.plot(grid, np.polyval(calibration.fit.coefficients, grid), "r-", label=f"degree {calibration.spec.order} fit")
    axis.set(
        xlabel=f"{calibration.spec.probe} relative L1 change",
        ylabel="output relative L1 change",
        title=f"{calibration.spec.model}: RMSE {calibration.fit.rmse:.4f}, R² {calibration.fit.r2:.3f}",
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
