"""Optional test-time augmentation (features averaged over flips / rotations) and H&E stain augmentation."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable

import numpy as np
import torch

from ubc_ocean.config import ConfigError

TTA_MODES = ("none", "flips", "dihedral")


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """Views of a [B, C, H, W] batch: itself; + horizontal and vertical flips; or all 8 dihedral views."""
    if mode == "none":
        return [x]
    if mode == "flips":
        return [x, torch.flip(x, dims=[-1]), torch.flip(x, dims=[-2])]
    if mode == "dihedral":
        rotations = [torch.rot90(x, k, dims=[-2, -1]) for k in range(4)]
        return rotations + [torch.flip(view, dims=[-1]) for view in rotations]
    raise ValueError(f"unknown features.tta {mode!r}; one of {TTA_MODES}")


def stain_augmenter(seed_text: str, strength: float) -> Callable[[np.ndarray], np.ndarray]:
    """A seeded albumentations H&E stain jitter (``HEStain``) for uint8 tile batches [B, H, W, 3]."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations 2 asks PyPI for news at import
    import albumentations as A

    if not hasattr(A, "HEStain"):  # albumentations < 2.0.4, e.g. Kaggle's images of 2024
        raise ConfigError(f"features.stain_augmentation needs albumentations >= 2.0.4 (HEStain); this environment "
                          f"has {A.__version__}: upgrade it or set features.stain_augmentation=0")
    transform = A.Compose(
        [A.HEStain(method="random_preset", intensity_scale_range=(1 - strength, 1 + strength),
                   intensity_shift_range=(-strength, strength), p=1.0)],
        seed=zlib.crc32(seed_text.encode()),
    )

    def apply(batch: np.ndarray) -> np.ndarray:
        return np.stack([transform(image=np.ascontiguousarray(tile))["image"] for tile in batch])

    return apply
