"""Tiny DiTs trained on digits, shipped with cachekit: real denoising dynamics that run anywhere.

pipe = cachekit.testbed.load("flux-digits")
images = pipe(labels=[3, 7], seed=0)          # CFG as two calls per step, 50 steps
print(cachekit.testbed.score(images, torch.tensor([3, 7])))
"""

from __future__ import annotations

from typing import cast

import torch

from cachekit.testbed.classifier import Score, score
from cachekit.testbed.models import CLASSES, SPECS, ClassConditioning
from cachekit.testbed.pipeline import TestbedPipeline
from cachekit.testbed.weights import load_weights

INIT_SEED = 0


def names() -> list[str]:
    return sorted(SPECS)


def load(name: str, trained: bool = True) -> TestbedPipeline:
    """The testbed model `name` with its trained weights, or its (seeded) untrained initialisation."""
    if name not in SPECS:
        raise KeyError(f"unknown testbed model {name!r}; known: {', '.join(names())}")
    spec = SPECS[name]
    torch.manual_seed(INIT_SEED)
    modules = torch.nn.ModuleDict({"transformer": spec.build(), "conditioning": ClassConditioning(spec.pooled)})
    if trained:
        tensors, _ = load_weights(name)
        modules.load_state_dict({key: value.float() for key, value in tensors.items()})
    conditioning = cast(ClassConditioning, modules["conditioning"])
    return TestbedPipeline(spec, modules["transformer"].eval(), conditioning.eval())


def evaluate(pipe: TestbedPipeline, per_class: int = 5, seed: int = 0, **generate: object) -> Score:
    """Generate `per_class` samples of every digit in one batch and score them."""
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    return score(pipe(labels, seed=seed, **generate), labels)  # type: ignore[arg-type]


__all__ = ["Score", "TestbedPipeline", "evaluate", "load", "names", "score"]
