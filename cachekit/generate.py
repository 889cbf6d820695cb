"""One generation under a strategy beside the uncached one, from the same initial noise: what
`cachekit generate` prints (the strategy's summary, both latencies, the speedup and PSNR), so a
strategy can be tried on a model in one line before a study compares several."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cachekit.metric import Sample
from cachekit.registry import make_config
from cachekit.schemas.study import Generation
from cachekit.study.metrics import metrics_for
from cachekit.study.models import load_model, on_device
from cachekit.study.plan import StudySpecError, check_device, check_model
from cachekit.study.runner import apply_setting, timed
from cachekit.study.samples import IMAGE, VIDEO, media_suffix, write_mp4, write_png
from cachekit.study.workers import use_threads


@dataclass(frozen=True)
class Generated:
    output: torch.Tensor  # under the strategy, in [-1, 1]
    reference: torch.Tensor  # uncached, from the same noise
    seconds: float
    uncached_seconds: float
    psnr: float  # dB against the uncached output
    summary: str  # the handle's

    @property
    def speedup(self) -> float:
        return self.uncached_seconds / self.seconds

    def report(self) -> str:
        return (
            f"{self.summary}\n"
            f"uncached {self.uncached_seconds:.3f} s, cached {self.seconds:.3f} s: {self.speedup:.2f}x speedup, "
            f"PSNR {self.psnr:.2f} dB against the uncached output"
        )


def generate(model: str, strategy: Any, condition: str, seed: int = 0, warmup: int = 1, **settings: Any) -> Generated:
    """Generate `condition` (a prompt, or a testbed model's class label) with `model` (a testbed name,
    a pipeline folder or hub id) uncached and under `strategy`, from the seed's noise; `settings`
    are a study's generation fields (steps, height, width, guidance_scale, device, dtype, threads,
    ...). `warmup` uncached generations run first, untimed, so first-run costs time neither."""
    from cachekit import testbed

    config = make_config(strategy)
    conditions = {"labels": [int(condition)]} if model in testbed.names() else {"prompts": [condition]}
    try:
        spec = Generation(**conditions, seeds=[seed], **settings)
    except ValueError as error:
        raise StudySpecError(f"generate: {error}") from None
    check_model(model, spec, "generate")
    check_device(spec.device)
    use_threads(spec, [model])
    loaded = load_model(model, spec)
    with on_device(spec.device):
        for _ in range(warmup):
            loaded.generate(seed, condition)
        uncached_seconds, reference = timed(lambda: loaded.generate(seed, condition), spec.device)
        with apply_setting(loaded.target, config) as handle:
            seconds, output = timed(lambda: loaded.generate(seed, condition), spec.device)
    psnr = metrics_for([], "psnr").active[0](Sample(output.cpu(), reference.cpu(), condition))
    return Generated(output.cpu(), reference.cpu(), seconds, uncached_seconds, float(psnr), handle.summary())


def save(output: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """The first sample of `output` as the PNG (image) or MP4 (video) `path` names."""
    path = Path(path)
    kind = media_suffix(output)
    if kind is None:
        raise ValueError(f"the output of shape {tuple(output.shape)} is neither an image nor a video")
    if path.suffix.lower() != kind:
        what = "an image" if kind == IMAGE else "a video"
        raise ValueError(f"--out {path}: the model made {what}, saved as {kind}; give a path ending in {kind}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == VIDEO:
        write_mp4(output[0], path, fps)
    else:
        write_png(output[0], path)
    return path
