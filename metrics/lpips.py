"""LPIPS (AlexNet) against the uncached output, through torchmetrics, when torchvision and its
AlexNet weights are already on this machine; nothing is downloaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from cachekit.hookspecs import hookimpl
from cachekit.metric import Metric, Sample
from cachekit.metrics.fidelity import as_images, colour_frames

#: torchvision's AlexNet weights, which torchmetrics' LPIPS loads from the torch hub cache.
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


class LPIPS(Metric):
    name = "lpips"
    better = "lower"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("torchvision") is None:
            return "torchvision is not installed"
        weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
        if not weights.is_file():
            return f"{weights} is not on this machine (it is never downloaded)"
        return None

    def __call__(self, sample: Sample) -> float:
        from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

        preds, target = colour_frames(sample.output.float()), as_images(sample.reference.float())
        if preds.shape[1] == 1:
            preds, target = preds.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        return float(learned_perceptual_image_patch_similarity(preds, target, net_type="alex"))


@hookimpl
def cachekit_register_metrics(register):
    register(LPIPS)
