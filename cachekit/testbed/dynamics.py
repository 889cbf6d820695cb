"""How the trained image model's probe and output change across a generation.

TeaCache rests on one claim: the change of the timestep-modulated input (the probe) tracks the
change of the model's output. This records both per step of uncached generations (the cond
branch, averaged over the ten digits), reports their correlation and draws them side by side, so
studies on the testbed can cite it.

    python -m cachekit.testbed.dynamics [--out docs/testbed-dynamics.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cachekit.calibrate import Recording, record
from cachekit.schemas.study import Generation
from cachekit.study.models import TestbedModel

STEPS = 50


@dataclass
class Dynamics:
    probe_change: list[float]  # per step from the second: relative L1 against the previous step
    output_change: list[float]
    pearson: float
    spearman: float


def dynamics(name: str, trained: bool = True, seed: int = 0) -> Dynamics:
    model = TestbedModel(name, Generation(labels=list(range(10)), steps=STEPS), trained=trained)
    recording = Recording()
    for label in range(10):
        recording.extend(record(model, seed, str(label)))
    per_step: dict[int, list[tuple[float, float]]] = {}
    for step, branch, x, y in zip(recording.steps, recording.branches, recording.x, recording.y, strict=True):
        if branch == 0:
            per_step.setdefault(step, []).append((x, y))
    probe = [statistics.fmean(x for x, _ in per_step[step]) for step in sorted(per_step)]
    output = [statistics.fmean(y for _, y in per_step[step]) for step in sorted(per_step)]
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    return Dynamics(
        probe_change=probe,
        output_change=output,
        pearson=float(np.corrcoef(probe, output)[0, 1]),
        spearman=float(np.corrcoef(ranks(probe), ranks(output))[0, 1]),
    )


def plot(result: Dynamics, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(result.probe_change) + 1)
    figure, (over_steps, against) = plt.subplots(1, 2, figsize=(11, 4))
    over_steps.plot(steps, result.probe_change, label="probe (modulated input)")
    over_steps.plot(steps, result.output_change, label="model output")
    over_steps.set(xlabel="step", ylabel="relative L1 change vs previous step", yscale="log", title=title)
    over_steps.legend()
    against.scatter(result.probe_change, result.output_change, c=steps, cmap="viridis", s=14)
    against.set(
        xlabel="probe change",
        ylabel="output change",
        xscale="log",
        yscale="log",
        title=f"Pearson {result.pearson:.2f}, Spearman {result.spearman:.2f} (colour: step)",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cachekit.testbed.dynamics", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-digits")
    parser.add_argument("--out", type=Path, default=Path("testbed-dynamics.png"))
    args = parser.parse_args(argv)
    for trained in (True, False):
        result = dynamics(args.model, trained)
        state = "trained" if trained else "untrained"
        path = args.out if trained else args.out.with_name(f"{args.out.stem}-untrained{args.out.suffix}")
        plot(result, f"{args.model} ({state}), {STEPS} steps, CFG, shift 3", path)
        print(json.dumps({"model": args.model, "state": state, "png": str(path), **asdict(result)}))


if __name__ == "__main__":
    main()
