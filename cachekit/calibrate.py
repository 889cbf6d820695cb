"""Calibration: fit TeaCache's rescale polynomial, and measure MagCache's magnitude ratios, on
any model an adapter supports.

Uncached generations are recorded call by call, per CFG branch: x = relative L1 change of the
probe since the branch's previous call, y = that of the model output. A polynomial fit of y on x
(numpy) gives the coefficients. The block stack's residual r is recorded too: the mean over its
tokens of |r_t| / |r_t-1| is the step's magnitude ratio. The preset written carries the model's
identity, the fit's error and the data size, and the ratios per step (the mean over branches and
generations; 1.0 at the first step).
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cachekit.adapter import Adapter, BlockArgument
from cachekit.registry import resolve_adapter
from cachekit.runtime.placement import context_parallel_group
from cachekit.schemas.calibration import CalibrationSpec
from cachekit.schemas.teacache import Probe, TeaCachePreset
from cachekit.signals import mean_abs, reduced_over, relative_l1
from cachekit.steps import StepTracker
from cachekit.study.models import StudyModel, load_model
from cachekit.study.workers import join


@dataclass
class Recording:
    """Per call after the first of each branch: the step, the branch, x, y, and the residual's
    magnitude ratio."""

    steps: list[int] = field(default_factory=list)
    branches: list[int] = field(default_factory=list)
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    mag_ratios: list[float] = field(default_factory=list)  # mean over tokens of |r_t| / |r_t-1|

    def extend(self, other: Recording) -> None:
        for name in ("steps", "branches", "x", "y", "mag_ratios"):
            getattr(self, name).extend(getattr(other, name))


def record(model: StudyModel, seed: int, condition: str, probe: Probe = "modulated_input") -> Recording:
    """Run one uncached generation and record every call's probe and output changes."""
    transformer = model.transformer
    adapter = resolve_adapter(transformer)(transformer)
    tracker = StepTracker(None)
    recording = Recording()
    current: dict[str, Any] = {}
    previous: dict[int, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}

    def begin(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        current["step"] = tracker.advance(adapter.step_of(args, kwargs), adapter.latent_input(args, kwargs))

    def end(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        with reduced_over(context_parallel_group(transformer)):  # every rank records what one process would
            record_call(output)

    def record_call(output: Any) -> None:
        step = current["step"]
        signal, out, residual = current["signal"], adapter.prediction(output), current.pop("residual")
        if step.branch in previous:
            last_signal, last_out, last_residual = previous[step.branch]
            recording.steps.append(step.index)
            recording.branches.append(step.branch)
            recording.x.append(relative_l1(signal, last_signal))
            recording.y.append(relative_l1(out, last_out))
            recording.mag_ratios.append(_magnitude_ratio(residual, last_residual))
        previous[step.branch] = (signal, out, residual)

    hooks = [
        transformer.register_forward_pre_hook(begin, with_kwargs=True),
        transformer.register_forward_hook(end, with_kwargs=True),
        _signal_hook(adapter, probe, current),
        *_residual_hooks(adapter, current),
    ]
    try:
        model.generate(seed, condition)
    finally:
        for hook in hooks:
            hook.remove()
    return recording


def _signal_hook(adapter: Adapter, probe: Probe, current: dict[str, Any]) -> Any:
    """A hook that puts the signal `probe` names in `current["signal"]` at every call."""
    first_block = adapter.span().blocks[0][0]
    if probe == "modulated_input":

        def keep_probe(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current["signal"] = adapter.probe(args, kwargs)

        return first_block.register_forward_pre_hook(keep_probe, with_kwargs=True)
    site = adapter.timestep_embedding() if probe == "timestep_embedding" else adapter.projected_timestep_embedding()
    if isinstance(site, BlockArgument):
        argument = site

        def keep_argument(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current["signal"] = argument.read(args, kwargs)

        return first_block.register_forward_pre_hook(keep_argument, with_kwargs=True)
    output_site = site
    return output_site.module.register_forward_hook(
        lambda _, args, output: current.__setitem__("signal", output_site.read(output))
    )


def _residual_hooks(adapter: Adapter, current: dict[str, Any]) -> list[Any]:
    """Hooks that put the block stack's residual on the first stream in `current["residual"]`,
    one tensor per segment of the span."""
    hooks = []
    for segment in adapter.span().segments:
        (first, first_streams), (last, last_streams) = segment[0], segment[-1]

        def enter(_: torch.nn.Module, args: Any, kwargs: Any, streams: Any = first_streams) -> None:
            current["entered"] = streams.read_inputs(args, kwargs)[0]

        def leave(_: torch.nn.Module, args: Any, kwargs: Any, output: Any, streams: Any = last_streams) -> None:
            residual = streams.read_outputs(output)[0] - current.pop("entered")
            current.setdefault("residual", []).append(residual)

        hooks.append(first.register_forward_pre_hook(enter, with_kwargs=True))
        hooks.append(last.register_forward_hook(leave, with_kwargs=True))
    return hooks


def _magnitude_ratio(residual: list[torch.Tensor], previous: list[torch.Tensor]) -> float:
    """The mean over tokens of |r_t| / |r_t-1| (norms over channels, in float32)."""
    ratios = [
        (now.float().norm(dim=-1) / (before.float().norm(dim=-1) + 1e-8)).flatten()
        for now, before in zip(residual, previous, strict=True)
    ]
    return mean_abs(torch.cat(ratios))  # ratios are positive; reduced over a context-parallel group


@dataclass(frozen=True)
class Fit:
    coefficients: tuple[float, ...]  # highest power first
    rmse: float
    r2: float
    samples: int


#: Below this R², a fit leaves too much of the accumulated change unexplained to decide steps by.
WEAK_FIT = 0.8


class CalibrationWarning(UserWarning):
    """A calibration that ran but whose fit should not be trusted as is."""


def check_fit(result: Fit) -> None:
    """Warn where the fit explains little of what it was fitted to."""
    if result.r2 < WEAK_FIT:
        warnings.warn(
            f"a weak fit: R² {result.r2:.2f} (below {WEAK_FIT}) over {result.samples} calls, so TeaCache would decide "
            "from a poor estimate of the output's change; record more seeds or conditions, try another probe, or "
            "compare against a study before using the preset",
            CalibrationWarning,
            stacklevel=3,
        )


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

    def preset(self, name: str | None = None) -> TeaCachePreset:
        """The preset, named `name` (else the spec's name, else '<model>-calibrated')."""
        ratios: dict[int, list[float]] = {0: [1.0]}
        for step, ratio in zip(self.recording.steps, self.recording.mag_ratios, strict=True):
            ratios.setdefault(step, []).append(ratio)
        return TeaCachePreset(
            name=name or self.spec.preset_name(),
            adapter=self.identity.split(":")[0],
            auto=False,
            coefficients=self.fit.coefficients,
            probe=self.spec.probe,
            steps=self.spec.steps,
            identity=self.identity,
            fit={"rmse": self.fit.rmse, "r2": self.fit.r2, "samples": self.fit.samples, "order": self.spec.order},
            mag_ratios=tuple(statistics.fmean(ratios[step]) for step in sorted(ratios)),
            notes=f"calibrated on {self.spec.model}, seeds {self.spec.seeds}, {len(self.spec.conditions())} conditions",
        )


def calibrate(spec: CalibrationSpec, model: StudyModel | None = None, progress: bool = False) -> Calibration:
    """Record every seed x condition of `spec` uncached and fit the polynomial. Under `torchrun`
    the generations are shared out (`cachekit.study.workers`) and gathered in the order one
    process would record them, so the fit is the same. `progress`: a bar over the generations."""
    workers = join(spec)
    try:
        if model is None:
            model = load_model(spec.model, spec)
            workers.parallelize(model.transformer)
        pairs = [(seed, condition) for seed in spec.seeds for condition in spec.conditions()]
        share = workers.share(range(len(pairs)))
        bar = tqdm(share, desc="calibrating", unit="generation", disable=not progress or workers.rank != 0)
        mine = {index: record(model, pairs[index][0], pairs[index][1], spec.probe) for index in bar}
        recorded: dict[int, Recording] = {}
        for part in workers.gather(mine):  # the processes of a context group recorded the same
            recorded.update(part)
    finally:
        workers.leave()
    recording = Recording()
    for index in sorted(recorded):
        recording.extend(recorded[index])
    identity = resolve_adapter(model.transformer)(model.transformer).identity()
    fitted = fit(recording.x, recording.y, spec.order)
    check_fit(fitted)
    return Calibration(spec, identity, recording, fitted)


def write_preset(calibration: Calibration, path: str | Path) -> Path:
    """Write the preset to `path`, named after the file unless the spec names it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(calibration.preset(calibration.spec.name or path.stem).model_dump_json(indent=2) + "\n")
    return path


def plot(calibration: Calibration, path: str | Path) -> Path:
    """x against y with the fitted curve, so a user sees whether the fit is trustworthy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = np.asarray(calibration.recording.x), np.asarray(calibration.recording.y)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    dots = axis.scatter(x, y, c=calibration.recording.steps, cmap="viridis", s=8, label="calls")
    figure.colorbar(dots, ax=axis, label="step")
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
