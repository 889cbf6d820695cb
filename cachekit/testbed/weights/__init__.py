"""Trained testbed weights, shipped with the package and read offline."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

#: Where the trainer writes (the source folder when run from a checkout).
WEIGHTS_DIR = Path(__file__).parent


def load_weights(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of `name.safetensors` in this package."""
    resource = resources.files(__package__).joinpath(f"{name}.safetensors")
    if not resource.is_file():
        raise FileNotFoundError(f"no trained weights for {name!r}: run `python -m cachekit.testbed.train {name}`")
    with resources.as_file(resource) as path, safe_open(path, framework="pt") as weights:
        return {key: weights.get_tensor(key) for key in weights.keys()}, weights.metadata() or {}  # noqa: SIM118
