"""H&E views of a tile for encoder adaptation: crops, dihedral symmetries, stain and colour jitter, blur, JPEG.

Every view is seeded by the integers it is asked for (the run's seed, the step, the slot in the batch), so a
resumed run, or one with another number of DataLoader workers, draws the same views. Histology has no
up or down: each view takes one of the 8 dihedral symmetries (albumentations ``D4``). The stain jitter is
albumentations' ``HEStain`` (H&E-specific colour deconvolution, intensity scale and shift of each stain).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

GLOBAL_VIEWS = {"dino": 2, "moco": 2, "supcon": 2, "finetune": 1}


def _albumentations():  # type: ignore[no-untyped-def]
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations 2 asks PyPI for news at import
    import albumentations as A

    return A


def view_transform(size: int, scale: Sequence[float], adapt: Mapping):  # type: ignore[no-untyped-def]
    """One view's albumentations pipeline: random resized crop to ``size`` px of an area fraction in
    ``scale``, a dihedral symmetry, then the configured stain jitter, colour jitter, blur and JPEG."""
    A = _albumentations()
    steps = [A.RandomResizedCrop(size=(size, size), scale=(float(scale[0]), float(scale[1])), p=1.0), A.D4(p=1.0)]
    stain = float(adapt["stain_jitter"])
    if stain > 0:
        steps.append(A.HEStain(method="random_preset", intensity_scale_range=(1 - stain, 1 + stain),
                               intensity_shift_range=(-stain, stain), p=0.8))
    colour = float(adapt["colour_jitter"])
    if colour > 0:
        steps.append(A.ColorJitter(brightness=colour, contrast=colour, saturation=colour, hue=colour / 4, p=0.8))
    if adapt["blur_probability"] > 0:
        steps.append(A.GaussianBlur(sigma_limit=(0.1, 1.5), p=float(adapt["blur_probability"])))
    if adapt["jpeg_probability"] > 0:
        steps.append(A.ImageCompression(quality_range=(60, 95), p=float(adapt["jpeg_probability"])))
    return A.Compose(steps)


@dataclass
class ViewMaker:
    """The views one method trains on: ``globals`` views at the encoder's input size, then ``locals`` small
    ones (DINO's multi-crop); each a normalised float tensor [3, S, S]."""

    global_transform: object
    local_transform: object | None
    globals: int
    locals: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def for_method(cls, adapt: Mapping, input_size: int, mean: Sequence[float], std: Sequence[float],
                   fixed_size: bool) -> ViewMaker:
        """The views of ``adapt.method``; ``fixed_size``: the encoder takes only its input size (a ViT), so
        local crops are resized to it."""
        method = str(adapt["method"])
        locals_ = int(adapt["local_crops"]) if method == "dino" else 0
        local_size = input_size if fixed_size else int(adapt["local_crop_size"])
        local = view_transform(local_size, adapt["local_crop_scale"], adapt) if locals_ else None
        return cls(view_transform(input_size, adapt["crop_scale"], adapt), local, GLOBAL_VIEWS[method], locals_,
                   tuple(mean), tuple(std))  # type: ignore[arg-type]

    def __call__(self, tile: np.ndarray, seed: Sequence[int]) -> list[torch.Tensor]:
        """The views of a uint8 RGB tile [H, W, 3], drawn with ``seed`` (a few integers)."""
        views = []
        for position in range(self.globals + self.locals):
            transform = self.global_transform if position < self.globals else self.local_transform
            transform.set_random_seed(_seed([*seed, position]))  # type: ignore[union-attr]
            views.append(self.normalise(transform(image=np.ascontiguousarray(tile))["image"]))  # type: ignore[operator]
        return views

    def normalise(self, image: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> float [3, H, W] with the encoder's mean and std."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


def _seed(parts: Sequence[int]) -> int:
    """A 32-bit seed from a few integers (stable across processes, unlike ``hash``)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes())
