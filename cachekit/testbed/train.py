"""Train the testbed models and the digit classifier, reproducibly (fixed seeds), on the CPU.

    python -m cachekit.testbed.train                 # everything
    python -m cachekit.testbed.train flux-digits     # one model

Writes fp16 safetensors into cachekit/testbed/weights/, with the training facts as metadata.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from cachekit.testbed import evaluate
from cachekit.testbed.classifier import DigitClassifier, feature_statistics
from cachekit.testbed.data import moving, real_digits, shifted, split
from cachekit.testbed.models import NULL_CLASS, SPECS, ClassConditioning, Spec
from cachekit.testbed.pipeline import TestbedPipeline
from cachekit.testbed.weights import WEIGHTS_DIR

SEED = 0
CFG_DROPOUT = 0.1
EMA_DECAY = 0.999
WARMUP = 200


def train_model(
    spec: Spec, steps: int | None = None, log_every: int = 500
) -> tuple[nn.Module, ClassConditioning, dict[str, str]]:
    """Rectified flow: x_t = (1 - t) x0 + t noise, the model predicts noise - x0."""
    torch.manual_seed(SEED)
    steps = steps or spec.train_steps
    images, labels = real_digits()
    train_index, _ = split(len(labels))
    images, labels = images[train_index], labels[train_index]
    transformer, conditioning = spec.build(), ClassConditioning(spec.pooled)
    modules = nn.ModuleDict({"transformer": transformer, "conditioning": conditioning})
    ema = copy.deepcopy(modules).requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    generator = torch.Generator().manual_seed(SEED)
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        index = torch.randint(len(labels), (spec.batch_size,), generator=generator)
        x0 = images[index] if spec.kind == "image" else moving(images[index], generator)
        label = torch.where(torch.rand(spec.batch_size, generator=generator) < CFG_DROPOUT, NULL_CLASS, labels[index])
        t = torch.rand(spec.batch_size, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        xt = (1 - t.view(-1, *[1] * (x0.ndim - 1))) * x0 + t.view(-1, *[1] * (x0.ndim - 1)) * noise
        tokens, pooled = conditioning(label)
        loss = F.mse_loss(spec.velocity(transformer, xt, t, tokens, pooled), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), modules.parameters(), strict=True):
                averaged.lerp_(current, 1 - EMA_DECAY)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % log_every == 0:
            print(
                f"{spec.name} step {step + 1}/{steps} loss {running:.4f} {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    facts = {
        "steps": str(steps),
        "batch_size": str(spec.batch_size),
        "loss": f"{running:.4f}",
        "seconds": f"{time.perf_counter() - start:.0f}",
    }
    return ema["transformer"], cast(ClassConditioning, ema["conditioning"]), facts


def train_classifier(epochs: int = 40) -> tuple[DigitClassifier, float]:
    torch.manual_seed(SEED)
    images, labels = real_digits()
    train_index, test_index = split(len(labels))
    classifier = DigitClassifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        for batch in order.split(64):
            loss = F.cross_entropy(classifier(shifted(images[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(images[test_index]).argmax(1) == labels[test_index]).float().mean().item()
    return classifier, accuracy


def save_classifier(out: Path) -> float:
    classifier, accuracy = train_classifier()
    images, _ = real_digits()
    with torch.no_grad():
        mean, cov = feature_statistics(classifier.features(images))
    tensors = {**classifier.state_dict(), "real_mean": mean.float(), "real_cov": cov.float()}
    save_file(tensors, out / "digit-classifier.safetensors", metadata={"held_out_accuracy": f"{accuracy:.4f}"})
    print(f"digit classifier: {accuracy:.1%} on held-out real digits")
    return accuracy


def save_model(name: str, out: Path, steps: int | None = None) -> None:
    spec = SPECS[name]
    transformer, conditioning, facts = train_model(spec, steps)
    result = evaluate(TestbedPipeline(spec, transformer.eval(), conditioning.eval()))
    facts |= {"class_accuracy": f"{result.accuracy:.4f}", "frechet_distance": f"{result.frechet_distance:.3f}"}
    tensors = {f"transformer.{k}": v.half() for k, v in transformer.state_dict().items()}
    tensors |= {f"conditioning.{k}": v.half() for k, v in conditioning.state_dict().items()}
    save_file(tensors, out / f"{name}.safetensors", metadata=facts)
    print(f"{name}: {json.dumps(facts)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cachekit.testbed.train", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"of {['digit-classifier', *SPECS]}; default: all")
    parser.add_argument("--steps", type=int, help="override the number of training steps")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for the weights (default: the package's)")
    args = parser.parse_args(argv)
    unknown = set(args.names) - {"digit-classifier", *SPECS}
    if unknown:
        parser.error(f"unknown names {sorted(unknown)}; known: digit-classifier, {', '.join(SPECS)}")
    for name in args.names or ["digit-classifier", *SPECS]:
        if name == "digit-classifier":
            save_classifier(args.out)
        else:
            save_model(name, args.out, args.steps)


if __name__ == "__main__":
    main()
