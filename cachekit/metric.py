"""The metric contract: a quality figure of one generated sample, registered through the plugin
hooks like strategies and estimators (`cachekit_register_metrics`), and the helpers a metric may
use (a model's local file, a sample as RGB bytes). Which metrics a study computes is the study's
business (`cachekit.study.metrics`).

A metric compares a cached output with the uncached one of the same seed and condition
(`reference = True`: PSNR, SSIM, LPIPS, ...), or scores a sample on its own (CLIP score,
ImageReward, VBench dimensions), the uncached reference included. One that needs a package or
weights this machine lacks says so in `unavailable()`: a study then skips it with that note,
and never makes up a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from cachekit.errors import CachekitError


class MetricError(CachekitError, ValueError):
    """A metric that is not installed, cannot run on this machine, or got options it does not take."""


class MetricWarning(UserWarning):
    """A metric failed on a sample or returned no number: its value is left empty, the cell kept."""


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
    better: ClassVar[Literal["higher", "lower"]] = "higher"  # which values are better (LPIPS: lower)

    def unavailable(self) -> str | None:
        """Why it cannot run on this machine (a package or weights missing), or None."""
        return None

    def __call__(self, sample: Sample) -> float:
        raise NotImplementedError


def local_file(name: str, relative: str) -> Path | None:
    """A model's file from its local folder, or from the Hugging Face cache (nothing is
    downloaded); None where neither holds it."""
    if Path(name).is_dir():
        path = Path(name) / relative
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, relative)
    except Exception:  # an id the hub would reject: the load names the problem
        return None
    return Path(found) if isinstance(found, str) else None


def rgb_bytes(x: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """[-1, 1] values as 0-255 bytes, grey repeated into RGB along `channel_dim`: what image
    files and image processors take."""
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.repeat_interleave(3, dim=channel_dim) if x.shape[channel_dim] == 1 else x
