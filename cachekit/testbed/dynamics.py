"""How the trained image model's probe and output change across a generation.

TeaCache rests on one claim: the change of the timestep-modulated input (the probe) tracks the
change of the model's output. This records both per step of uncached generations, reports their
correlation and draws them side by side, so studies on the testbed can cite it.

    python -m cachekit.testbed.dynamics [--out docs/testbed-dynamics.png]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cachekit.registry import resolve_adapter
from cachekit.testbed.pipeline import TestbedPipeline


@dataclass
class Dynamics:
    timesteps: list[float]
    probe_change: list[float]  # relative L1 of the probe against the previous step (cond branch)
    output_change: list[float]  # relative L1 of the model output against the previous step
    pearson: float
    spearman: float


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


def record(pipe: TestbedPipeline, labels: list[int], seed: int = 0, steps: int = 50) -> Dynamics:
    """Run uncached with CFG and keep, per step, the cond branch's probe and output changes
    (averaged over the batch of `labels`)."""
    transformer = pipe.transformer
    adapter = resolve_adapter(transformer)(transformer)
    first_block = adapter.span().blocks[0][0]
    probes: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    hooks = [
        first_block.register_forward_pre_hook(
            lambda _, args, kwargs: probes.append(adapter.probe(args, kwargs)), with_kwargs=True
        ),
        transformer.register_forward_hook(lambda _, args, output: outputs.append(output[0])),
    ]
    try:
        pipe(labels, seed=seed, num_inference_steps=steps)
    finally:
        for hook in hooks:
            hook.remove()
    probes, outputs = probes[0::2], outputs[0::2]  # cond calls come first in each step
    probe_change = [relative_l1(probes[i], probes[i - 1]) for i in range(1, steps)]
    output_change = [relative_l1(outputs[i], outputs[i - 1]) for i in range(1, steps)]
    x, y = np.array(probe_change), np.array(output_change)
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    return Dynamics(
        timesteps=pipe.scheduler.timesteps[1:].tolist(),
        probe_change=probe_change,
        output_change=output_change,
        pearson=float(np.corrcoef(x, y)[0, 1]),
        spearman=float(np.corrcoef(ranks(x), ranks(y))[0, 1]),
    )


def plot(dynamics: Dynamics, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(dynamics.probe_change) + 1)
    figure, (over_steps, against) = plt.subplots(1, 2, figsize=(11, 4))
    over_steps.plot(steps, dynamics.probe_change, label="probe (modulated input)")
    over_steps.plot(steps, dynamics.output_change, label="model output")
    over_steps.set(xlabel="step", ylabel="relative L1 change vs previous step", yscale="log", title=title)
    over_steps.legend()
    against.scatter(dynamics.probe_change, dynamics.output_change, c=steps, cmap="viridis", s=14)
    against.set(
        xlabel="probe change",
        ylabel="output change",
        xscale="log",
        yscale="log",
        title=f"Pearson {dynamics.pearson:.2f}, Spearman {dynamics.spearman:.2f}",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    from cachekit import testbed

    parser = argparse.ArgumentParser(prog="python -m cachekit.testbed.dynamics", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-digits")
    parser.add_argument("--out", type=Path, default=Path("testbed-dynamics.png"))
    args = parser.parse_args(argv)
    labels = list(range(10))
    for trained in (True, False):
        dynamics = record(testbed.load(args.model, trained=trained), labels)
        state = "trained" if trained else "untrained"
        path = args.out if trained else args.out.with_name(f"{args.out.stem}-untrained{args.out.suffix}")
        plot(dynamics, f"{args.model} ({state}), 50 steps, CFG, shift 3", path)
        print(json.dumps({"model": args.model, "state": state, "png": str(path), **asdict(dynamics)}))


if __name__ == "__main__":
    main()
