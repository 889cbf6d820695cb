"""A third-party metric: the variance of a sample's Laplacian, a no-reference measure of
sharpness (blur lowers it), averaged over images, frames and channels."""

import torch
import torch.nn.functional as F

from cachekit import Metric, Sample, hookimpl

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


class Sharpness(Metric):
    name = "sharpness"
    reference = False  # scores a sample on its own

    def __call__(self, sample: Sample) -> float:
        x = sample.output.double()
        if x.ndim == 5:  # videos (B, C, F, H, W): every frame an image
            x = x.transpose(1, 2).flatten(0, 1)
        planes = x.flatten(0, 1).unsqueeze(1)  # (B*C, 1, H, W)
        edges = F.conv2d(planes, LAPLACIAN.double().view(1, 1, 3, 3))
        return float(edges.flatten(1).var(dim=1).mean())


@hookimpl
def cachekit_register_metrics(register):
    register(Sharpness)
