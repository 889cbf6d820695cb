"""CLIP score of a sample against its prompt: 100 x the cosine of CLIP's image and text
embeddings (averaged over a video's frames, floored at 0), as torchmetrics and the CLIPScore paper
define it, computed with transformers' CLIP model directly (torchmetrics' wrapper does not read the
outputs of transformers 5). Available where `transformers` is installed and the CLIP model is a
local folder or already in the Hugging Face cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from cachekit.hookspecs import hookimpl
from cachekit.metric import Metric, Sample, local_file, rgb_bytes
from cachekit.metrics.fidelity import colour_frames

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


class CLIPScore(Metric):
    name = "clip_score"
    reference = False

    def __init__(self, model: str = DEFAULT_MODEL) -> None:
        self.model = model
        self._loaded: tuple[Any, Any] | None = None

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("transformers") is None:
            return "transformers is not installed"
        if not Path(self.model).is_dir() and local_file(self.model, "config.json") is None:
            return f"the CLIP model {self.model!r} is neither a local folder nor in the Hugging Face cache"
        return None

    @torch.no_grad()
    def __call__(self, sample: Sample) -> float:
        from transformers import CLIPModel, CLIPProcessor

        frames = colour_frames(sample.output)
        if self._loaded is None:
            self._loaded = CLIPModel.from_pretrained(self.model).eval(), CLIPProcessor.from_pretrained(self.model)
        model, processor = self._loaded
        length = model.config.text_config.max_position_embeddings
        inputs = processor(
            text=[sample.condition] * len(frames),
            images=list(rgb_bytes(frames, channel_dim=1)),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=length,
        )
        outputs = model(**inputs)
        images = outputs.image_embeds / outputs.image_embeds.norm(dim=-1, keepdim=True)
        texts = outputs.text_embeds / outputs.text_embeds.norm(dim=-1, keepdim=True)
        return max(float(100 * (images * texts).sum(dim=-1).mean()), 0.0)


@hookimpl
def cachekit_register_metrics(register):
    register(CLIPScore)
