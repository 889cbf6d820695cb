"""Training data for the testbed, made from scikit-learn's bundled digits (nothing downloaded).

Images: the 8x8 digits upsampled bilinearly to 16x16, scaled to [-1, 1]. Videos: a digit
sliding one pixel per frame in one of four directions over 4 frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE = 16
FRAMES = 4
#: (dy, dx) per frame: right, left, down, up.
DIRECTIONS = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0]])


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 16, 16) images in [-1, 1] and their labels."""
    from sklearn.datasets import load_digits  # training and evaluation only

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(digits.target)


def split(count: int, seed: int = 0, held_out: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train / held-out split of `count` items."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    cut = int(count * (1 - held_out))
    return order[:cut], order[cut:]


def moving(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Clips (N, 1, FRAMES, 16, 16): each image slides one pixel per frame, wrapping around."""
    count = images.shape[0]
    direction = DIRECTIONS[torch.randint(len(DIRECTIONS), (count,), generator=generator)]
    start = -torch.randint(1, FRAMES, (count, 1), generator=generator)  # keeps shifts within [-3, 2]
    frames = []
    for frame in range(FRAMES):
        shift = direction * (start + frame)
        frames.append(
            torch.stack([img.roll(tuple(s.tolist()), dims=(-2, -1)) for img, s in zip(images, shift, strict=True)])
        )
    return torch.stack(frames, dim=2)


def shifted(images: torch.Tensor, generator: torch.Generator, most: int = 3) -> torch.Tensor:
    """Each image rolled by up to `most` pixels in each direction (classifier augmentation)."""
    shifts = torch.randint(-most, most + 1, (images.shape[0], 2), generator=generator)
    return torch.stack([img.roll(tuple(s.tolist()), dims=(-2, -1)) for img, s in zip(images, shifts, strict=True)])
