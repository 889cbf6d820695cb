"""Quality of a cached output against the uncached reference (torchmetrics does the maths).

Images (B, C, H, W) and videos (B, C, F, H, W, frames scored as images) in [-1, 1]. A metric that
cannot be computed is reported as None with the reason, never estimated.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

DATA_RANGE = 2.0  # outputs in [-1, 1]
# MS-SSIM downsamples 4 times with an 11-pixel window: smaller images have no coarsest scale.
MS_SSIM_MIN_SIZE = (11 - 1) * 2**4 + 1


@dataclass
class Quality:
    psnr: float  # dB; inf when the output equals the reference exactly
    ssim: float
    ms_ssim: float | None
    lpips: float | None
    notes: list[str] = field(default_factory=list)


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Videos (B, C, F, H, W) as a batch of frames (B*F, C, H, W); images unchanged."""
    return x.transpose(1, 2).flatten(0, 1) if x.ndim == 5 else x


def quality(output: torch.Tensor, reference: torch.Tensor) -> Quality:
    if output.shape != reference.shape:
        raise ValueError(f"output {tuple(output.shape)} and reference {tuple(reference.shape)} differ in shape")
    preds, target = as_images(output.double().cpu()), as_images(reference.double().cpu())
    notes = []
    if torch.equal(preds, target):
        psnr, ssim = float("inf"), 1.0
    else:
        psnr = float(peak_signal_noise_ratio(preds, target, data_range=DATA_RANGE))
        ssim = float(cast(torch.Tensor, structural_similarity_index_measure(preds, target, data_range=DATA_RANGE)))
    ms_ssim = None
    if min(preds.shape[-2:]) >= MS_SSIM_MIN_SIZE:
        ms_ssim = float(multiscale_structural_similarity_index_measure(preds, target, data_range=DATA_RANGE))
    else:
        notes.append(f"MS-SSIM skipped: images of {preds.shape[-2]}x{preds.shape[-1]} are under {MS_SSIM_MIN_SIZE} px")
    lpips, why_not = _lpips(preds, target)
    if why_not:
        notes.append(f"LPIPS skipped: {why_not}")
    return Quality(psnr, ssim, ms_ssim, lpips, notes)


#: torchvision's AlexNet weights, which torchmetrics' LPIPS loads from the torch hub cache.
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def _lpips(preds: torch.Tensor, target: torch.Tensor) -> tuple[float | None, str | None]:
    """LPIPS (AlexNet) when torchvision and its weights are already on this machine; no download."""
    if importlib.util.find_spec("torchvision") is None:
        return None, "torchvision is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.is_file():
        return None, f"{weights} is not on this machine (it is never downloaded)"
    if preds.shape[1] not in (1, 3):
        return None, f"it needs 1 or 3 channels, got {preds.shape[1]}"
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

    rgb = (lambda x: x.expand(-1, 3, -1, -1)) if preds.shape[1] == 1 else (lambda x: x)
    score = learned_perceptual_image_patch_similarity(rgb(preds).float(), rgb(target).float(), net_type="alex")
    return float(score), None
