"""QC overlay: the low-resolution view, the tissue mask tinted green, kept tiles outlined."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

QC_MAX_SIDE = 1024
_GREEN = (40, 200, 60)
_TILE_COLOUR = (30, 60, 230)


def draw_overlay(
    low_res: np.ndarray,
    tissue: np.ndarray,
    boxes: Sequence[tuple[int, int]],
    extent: int,
    slide_size: tuple[int, int],
    max_side: int = QC_MAX_SIDE,
    view_origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """An RGB picture (longest side at most ``max_side``) for a person to check one slide's tiling;
    ``low_res`` shows the level-0 region of ``slide_size`` starting at ``view_origin``."""
    height, width = low_res.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    view = cv2.resize(low_res, size, interpolation=cv2.INTER_AREA) if scale < 1 else low_res.copy()
    mask = cv2.resize(tissue.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    tinted = cv2.addWeighted(view, 0.7, np.full_like(view, _GREEN), 0.3, 0)
    view[mask] = tinted[mask]
    scale_x = size[0] / slide_size[0]
    scale_y = size[1] / slide_size[1]
    for x, y in boxes:
        x, y = x - view_origin[0], y - view_origin[1]
        top_left = (int(x * scale_x), int(y * scale_y))
        bottom_right = (int((x + extent) * scale_x) - 1, int((y + extent) * scale_y) - 1)
        cv2.rectangle(view, top_left, bottom_right, _TILE_COLOUR, 1)
    return view


def save_overlay(path: Path, overlay: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write QC overlay {path}")
