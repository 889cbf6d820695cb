"""Fidelity to the uncached output: PSNR, SSIM and MS-SSIM (torchmetrics does the maths).

Images (B, C, H, W) and videos (B, C, F, H, W), whose frames are scored as images, in [-1, 1].
torchmetrics is imported when a metric first scores, so loading the registry stays quick.
"""

from __future__ import annotations

from typing import cast

import torch

from cachekit.hookspecs import hookimpl
from cachekit.metric import Metric, MetricSkipped, Sample

DATA_RANGE = 2.0  # outputs in [-1, 1]
# MS-SSIM downsamples 4 times with an 11-pixel window: smaller images have no coarsest scale.
MS_SSIM_MIN_SIZE = (11 - 1) * 2**4 + 1


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Videos (B, C, F, H, W) as a batch of frames (B*F, C, H, W); images unchanged."""
    return x.transpose(1, 2).flatten(0, 1) if x.ndim == 5 else x


def colour_frames(x: torch.Tensor) -> torch.Tensor:
    """A sample's images or video frames (N, C, H, W) for the metrics that score pictures, which
    take 1 (grey) or 3 (RGB) channels; other channel counts skip the sample."""
    frames = as_images(x)
    if frames.shape[1] not in (1, 3):
        raise MetricSkipped(f"it needs 1 or 3 channels, got {frames.shape[1]}")
    return frames


def _pair(sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    if sample.output.shape != sample.reference.shape:
        raise ValueError(
            f"output {tuple(sample.output.shape)} and reference {tuple(sample.reference.shape)} differ in shape"
        )
    return as_images(sample.output.double()), as_images(sample.reference.double())


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """dB against `reference`; inf when equal."""
    return PSNR()(Sample(output.cpu(), reference.cpu(), ""))


class PSNR(Metric):
    name = "psnr"

    def __call__(self, sample: Sample) -> float:
        preds, target = _pair(sample)
        if torch.equal(preds, target):
            return float("inf")
        from torchmetrics.functional.image import peak_signal_noise_ratio

        return float(peak_signal_noise_ratio(preds, target, data_range=DATA_RANGE))


class SSIM(Metric):
    name = "ssim"

    def __call__(self, sample: Sample) -> float:
        preds, target = _pair(sample)
        if torch.equal(preds, target):
            return 1.0
        from torchmetrics.functional.image import structural_similarity_index_measure

        return float(cast(torch.Tensor, structural_similarity_index_measure(preds, target, data_range=DATA_RANGE)))


class MSSSIM(Metric):
    name = "ms_ssim"

    def __call__(self, sample: Sample) -> float:
        preds, target = _pair(sample)
        if min(preds.shape[-2:]) < MS_SSIM_MIN_SIZE:
            raise MetricSkipped(f"images of {preds.shape[-2]}x{preds.shape[-1]} are under {MS_SSIM_MIN_SIZE} px")
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

        return float(multiscale_structural_similarity_index_measure(preds, target, data_range=DATA_RANGE))


@hookimpl
def cachekit_register_metrics(register):
    for metric in (PSNR, SSIM, MSSSIM):
        register(metric)
