"""Per-tile quality scores: focus (blur) and marker-pen / black-artefact coverage."""

from __future__ import annotations

import cv2
import numpy as np

# OpenCV hue runs 0-179. H&E stains sit at pink-red-purple hues (about 125-179 and 0-10); marker pens
# used on slides are green, blue or black.
_GREEN_PEN_HUES = (35, 90)
_BLUE_PEN_HUES = (95, 122)
_PEN_MIN_SATURATION = 90


def blur_score(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey tile (0-255 scale): low means out of focus."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    _, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    return float(std[0, 0]) ** 2


def wavelet_energy(rgb: np.ndarray) -> float:
    """Mean energy of the first-level Haar detail bands (LH, HL, HH) of the grey tile (0-255 scale): the
    high-frequency content that defocus removes; low means out of focus."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)
    h, w = grey.shape[0] // 2 * 2, grey.shape[1] // 2 * 2
    a, b = grey[0:h:2, 0:w:2], grey[0:h:2, 1:w:2]
    c, d = grey[1:h:2, 0:w:2], grey[1:h:2, 1:w:2]
    horizontal, vertical, diagonal = (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2
    return float(np.mean(horizontal**2 + vertical**2 + diagonal**2))


FOCUS_METRICS = {"laplacian": blur_score, "wavelet": wavelet_energy}


def focus_score(rgb: np.ndarray, metric: str = "laplacian") -> float:
    """The tile's focus score by ``metric`` (one of ``FOCUS_METRICS``); low means out of focus."""
    try:
        return FOCUS_METRICS[metric](rgb)
    except KeyError:
        raise ValueError(f"tiling.blur_metric must be one of {sorted(FOCUS_METRICS)}, got {metric!r}") from None


def artefact_fraction(rgb: np.ndarray, black_value: int, dark_value: int) -> float:
    """Fraction of the tile covered by green/blue marker ink or near-black matter (ink, dust, folds).

    Near-black means max(R,G,B) in [black_value, dark_value): darker pixels are the WSI's black fill,
    which is background, not an artefact.
    """
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb[::2, ::2]), cv2.COLOR_RGB2HSV)  # a quarter of the pixels suffice
    green = cv2.inRange(hsv, (_GREEN_PEN_HUES[0], _PEN_MIN_SATURATION, 0), (_GREEN_PEN_HUES[1], 255, 255))
    blue = cv2.inRange(hsv, (_BLUE_PEN_HUES[0], _PEN_MIN_SATURATION, 0), (_BLUE_PEN_HUES[1], 255, 255))
    dark = cv2.inRange(hsv, (0, 0, black_value), (179, 255, dark_value - 1))  # HSV value is max(R, G, B)
    flagged = cv2.bitwise_or(cv2.bitwise_or(green, blue), dark)
    return cv2.countNonZero(flagged) / float(flagged.size)
