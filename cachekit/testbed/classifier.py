"""The testbed's quality yardstick: a small digit classifier trained on the real digits.

`score` reports how often samples are classified as the class they were generated for, and the
Fréchet distance between the classifier's features of the samples and of the real digits (the
real statistics ship with the classifier, so scoring needs no dataset).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from cachekit.testbed.weights import load_weights


class DigitClassifier(nn.Module):
    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass(frozen=True)
class Score:
    accuracy: float  # share of samples (video: frames) classified as their requested class
    frechet_distance: float  # between classifier features of the samples and of the real digits
    count: int


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_distance(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two Gaussians."""
    (mean_a, cov_a), (mean_b, cov_b) = a, b
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * root_trace)


@functools.cache
def _yardstick() -> tuple[DigitClassifier, tuple[torch.Tensor, torch.Tensor]]:
    tensors, _ = load_weights("digit-classifier")
    classifier = DigitClassifier()
    classifier.load_state_dict({k: v.float() for k, v in tensors.items() if not k.startswith("real_")})
    return classifier.eval(), (tensors["real_mean"].double(), tensors["real_cov"].double())


@torch.no_grad()
def score(samples: torch.Tensor, labels: torch.Tensor) -> Score:
    """Score images (B, 1, 16, 16) or videos (B, 1, F, 16, 16) in [-1, 1] generated for `labels`."""
    if samples.ndim == 5:
        frames = samples.shape[2]
        samples = samples.transpose(1, 2).flatten(0, 1)
        labels = labels.repeat_interleave(frames)
    if samples.shape[0] != labels.shape[0] or samples.shape[0] < 2:
        raise ValueError(
            f"score needs at least 2 samples with one label each, got {samples.shape[0]} and {labels.shape[0]}"
        )
    classifier, real = _yardstick()
    features = classifier.features(samples.float().cpu())
    accuracy = (classifier.head(features).argmax(1) == labels.cpu()).float().mean().item()
    return Score(accuracy, frechet_distance(feature_statistics(features), real), samples.shape[0])
