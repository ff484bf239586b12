"""QC overlay: the low-resolution view, the tissue mask tinted green, kept tiles outlined."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np


def draw_overlay(
    low_res: np.ndarray,
    tissue: np.ndarray,
    boxes: Sequence[tuple[int, int]],
    extent: int,
    slide_size: tuple[int, int],
) -> np.ndarray:
    """An RGB picture for a person to check the tiling of one slide at a glance."""
    overlay = low_res.astype(np.float32).copy()
    green = np.array([40, 200, 60], dtype=np.float32)
    overlay[tissue] = 0.7 * overlay[tissue] + 0.3 * green
    overlay = overlay.astype(np.uint8)
    scale_x = low_res.shape[1] / slide_size[0]
    scale_y = low_res.shape[0] / slide_size[1]
    for x, y in boxes:
        top_left = (int(x * scale_x), int(y * scale_y))
        bottom_right = (int((x + extent) * scale_x) - 1, int((y + extent) * scale_y) - 1)
        cv2.rectangle(overlay, top_left, bottom_right, (30, 60, 230), 1)
    return overlay


def save_overlay(path: Path, overlay: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write QC overlay {path}")
