"""Every cell's output as files people open: PNG for images, MP4 for videos (H.264 through PyAV),
and the exact tensor as safetensors.

Outputs are in [-1, 1]: images (B, C, H, W), videos (B, C, F, H, W), with 1 (grey) or 3 (RGB)
channels; a batch of several samples gives one file per sample (`-0`, `-1`, ...). Other shapes
keep only their tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from cachekit.metric import rgb_bytes

IMAGE, VIDEO, TENSOR = ".png", ".mp4", ".safetensors"


def slug(text: str, limit: int = 80) -> str:
    """`text` as one file or folder name: spaces as underscores, nothing a file system refuses, at
    most `limit` bytes (file systems count bytes: 80 CJK characters are 240)."""
    name = re.sub(r"\s+", "_", text.strip())
    name = re.sub(r"[^\w.=+@,-]", "-", name).strip(".") or "-"
    return name.encode()[:limit].decode(errors="ignore")


def model_slug(model: str) -> str:
    """A model's folder name: the last part of its hub id or path."""
    return slug(model.rstrip("/").split("/")[-1])


def as_bytes(x: torch.Tensor) -> np.ndarray:
    """One (C, ...) image or frame as 0-255 RGB bytes, channels last."""
    return rgb_bytes(x).movedim(0, -1).numpy()


def media_suffix(output: torch.Tensor) -> str | None:
    """The media file type an output is saved as, or None where it is neither image nor video."""
    if output.ndim in (4, 5) and output.shape[1] in (1, 3):
        return IMAGE if output.ndim == 4 else VIDEO
    return None


def write_sample(output: torch.Tensor, stem: Path, fps: int, tensor: bool = True) -> list[Path]:
    """Write `output` beside `stem` (a path without suffix); returns the files written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    suffix = media_suffix(output)
    if suffix is not None:
        for index, sample in enumerate(output):
            path = stem.with_name(stem.name + (f"-{index}" if len(output) > 1 else "") + suffix)
            if suffix == IMAGE:
                write_png(sample, path)
            else:
                write_mp4(sample, path, fps)
            written.append(path)
    if tensor:
        path = stem.with_name(stem.name + TENSOR)
        save_file({"output": output.detach().contiguous().cpu()}, path)
        written.append(path)
    return written


def write_png(image: torch.Tensor, path: Path) -> None:
    """One (C, H, W) image."""
    from PIL import Image

    Image.fromarray(as_bytes(image)).save(path, format="PNG")


def write_mp4(video: torch.Tensor, path: Path, fps: int) -> None:
    """One (C, F, H, W) video, H.264 in yuv420p (what players and VBench read); an odd height or
    width is padded by one edge pixel, as yuv420p needs even sizes."""
    import av

    frames = np.stack([as_bytes(video[:, index]) for index in range(video.shape[1])])  # (F, H, W, 3)
    height, width = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
