"""ImageReward: a learned estimate of human preference for a sample given its prompt (the
`image-reward` package), averaged over a video's frames. Available where the package is
installed and its checkpoint and BERT tokenizer are already on this machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from PIL import Image

from cachekit.hookspecs import hookimpl
from cachekit.metric import Metric, Sample, local_file, rgb_bytes
from cachekit.metrics.fidelity import colour_frames

CHECKPOINT = "ImageReward-v1.0"


class ImageReward(Metric):
    name = "image_reward"
    reference = False

    def __init__(self, download_root: str = "~/.cache/ImageReward") -> None:
        self.root = Path(download_root).expanduser()
        self._model: Any = None

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("ImageReward") is None:
            return "the image-reward package is not installed"
        for name in ("ImageReward.pt", "med_config.json"):
            if not (self.root / name).is_file():
                return f"{self.root / name} is not on this machine (it is never downloaded)"
        if local_file("bert-base-uncased", "vocab.txt") is None:
            return "its tokenizer, bert-base-uncased, is not in the Hugging Face cache"
        return None

    def __call__(self, sample: Sample) -> float:
        import ImageReward as reward

        frames = colour_frames(sample.output)
        if self._model is None:
            self._model = reward.load(CHECKPOINT, device="cpu", download_root=str(self.root))
        images = [Image.fromarray(rgb_bytes(frame).movedim(0, -1).numpy()) for frame in frames]
        scores = self._model.score(sample.condition, images)
        scores = scores if isinstance(scores, list) else [scores]
        return sum(scores) / len(scores)


@hookimpl
def cachekit_register_metrics(register):
    register(ImageReward)
