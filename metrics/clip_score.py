"""CLIP score of a sample against its prompt (torchmetrics' CLIPScore): 100 x the cosine of the
image and text embeddings, averaged over a video's frames. Available where `transformers` is
installed and the CLIP model is a local folder or already in the Hugging Face cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from cachekit.hookspecs import hookimpl
from cachekit.metric import Metric, MetricSkipped, Sample
from cachekit.metrics.fidelity import as_images

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


def in_hub_cache(repo: str, filename: str) -> bool:
    """Whether the Hugging Face cache holds `filename` of `repo` (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, filename), str)
    except Exception:  # not a valid repo id
        return False


def as_bytes(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats as 0-255 RGB bytes, the input image processors expect."""
    images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class CLIPScore(Metric):
    name = "clip_score"
    reference = False

    def __init__(self, model: str = DEFAULT_MODEL) -> None:
        self.model = model
        self._scorer: Any = None

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("transformers") is None:
            return "transformers is not installed"
        if not Path(self.model).is_dir() and not in_hub_cache(self.model, "config.json"):
            return f"the CLIP model {self.model!r} is neither a local folder nor in the Hugging Face cache"
        return None

    def __call__(self, sample: Sample) -> float:
        from torchmetrics.multimodal.clip_score import CLIPScore as Scorer

        frames = as_images(sample.output)
        if frames.shape[1] not in (1, 3):
            raise MetricSkipped(f"it needs 1 or 3 channels, got {frames.shape[1]}")
        if self._scorer is None:
            self._scorer = Scorer(model_name_or_path=self.model)
        self._scorer.reset()
        return float(self._scorer(list(as_bytes(frames)), [sample.condition] * len(frames)))


@hookimpl
def cachekit_register_metrics(register):
    register(CLIPScore)
