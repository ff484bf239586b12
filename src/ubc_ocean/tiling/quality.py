"""Per-tile quality scores."""

from __future__ import annotations

import cv2
import numpy as np


def blur_score(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey tile (0-255 scale): low means out of focus."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    _, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    return float(std[0, 0]) ** 2
