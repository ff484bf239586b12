"""Tissue detection on a low-resolution view: Otsu on HSV saturation, black and white fill as background.

H&E is colour: stained tissue is saturated, glass and fill are not. A view without colour (a greyscale
image: saturation 0 everywhere, so Otsu on it finds nothing) is split on intensity instead: how far a
pixel is from white, among the pixels that are not black or white fill.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from ubc_ocean.config.tiling import TilingSettings


def background_mask(rgb: np.ndarray, black_value: int, white_value: int) -> np.ndarray:
    """True where a pixel is WSI black fill (all channels dark) or glass/TMA white (all channels bright)."""
    red, green, blue = cv2.split(np.ascontiguousarray(rgb))
    brightest = cv2.max(cv2.max(red, green), blue)
    darkest = cv2.min(cv2.min(red, green), blue)
    return (brightest < black_value) | (darkest > white_value)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation scaled to 0-255 (uint8)."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values from their 256-bin histogram: the split maximising between-class variance."""
    histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    weight_low = np.cumsum(histogram)
    weight_high = weight_low[-1] - weight_low
    cumulative = np.cumsum(histogram * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = cumulative / weight_low
        mean_high = (cumulative[-1] - cumulative) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(np.nanargmax(np.nan_to_num(between, nan=-1.0)))


def saturation_threshold(sat: np.ndarray, candidate: np.ndarray, setting: str | float, floor: float) -> float:
    """Otsu's threshold (never below ``floor``) or a fixed number.

    Background pixels count as saturation 0 (dark fill can be noisy in hue and saturation), so Otsu
    separates tissue from background rather than splitting the tissue's own stains.
    """
    if setting != "otsu":
        return float(setting)
    values = np.where(candidate, sat, 0).astype(np.uint8)
    if values.size < 2 or values.min() == values.max():
        return float(floor)
    return max(otsu_threshold(values), float(floor))


SATURATION = "saturation"  # the tissue signals: colour (H&E) ...
INTENSITY = "intensity"    # ... or, in a view without colour, darkness (255 - grey level)
GREY_MAX_CHROMA = 12       # max(R,G,B) - min(R,G,B) up to this (0-255) is grey (a little JPEG chroma noise)
GREY_MAX_COLOURED = 0.001  # a view with at most this fraction of coloured foreground pixels is greyscale


def is_colourless(rgb: np.ndarray, foreground: np.ndarray) -> bool:
    """True when (nearly) every ``foreground`` pixel is grey: a greyscale image, where saturation has no
    tissue to find. A view with no foreground at all (blank, all black) is not called greyscale."""
    total = int(np.count_nonzero(foreground))
    if total == 0:
        return False
    red, green, blue = cv2.split(np.ascontiguousarray(rgb))
    chroma = cv2.subtract(cv2.max(cv2.max(red, green), blue), cv2.min(cv2.min(red, green), blue))
    coloured = int(np.count_nonzero((chroma > GREY_MAX_CHROMA) & foreground))
    return coloured <= GREY_MAX_COLOURED * total


def darkness(rgb: np.ndarray) -> np.ndarray:
    """255 minus the grey level (uint8): stained tissue is darker than glass."""
    return 255 - cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


@dataclass
class TissueMasks:
    """``tissue``: the cleaned tissue mask; ``foreground``: every pixel that is not black or white fill;
    ``signal``: what split tissue from the rest, :data:`SATURATION` or (a greyscale view) :data:`INTENSITY`."""

    tissue: np.ndarray
    foreground: np.ndarray
    signal: str = SATURATION


def detect_tissue(rgb: np.ndarray, settings: TilingSettings) -> TissueMasks:
    """Tissue masks of a low-resolution RGB view, with the tissue settings of ``settings``.

    Background (black fill, white glass) is removed first; Otsu then splits the remaining pixels on
    saturation (on darkness, always by Otsu, when the view has no colour); a closing-then-opening and hole
    filling clean the mask.
    """
    candidate = ~background_mask(rgb, settings.black_value, settings.white_value)
    if is_colourless(rgb, candidate):
        signal, values, setting = INTENSITY, darkness(rgb), "otsu"  # a fixed threshold is one of saturation
    else:
        signal, values, setting = SATURATION, saturation(rgb), settings.saturation_threshold
    threshold = saturation_threshold(values, candidate, setting, settings.min_saturation)
    mask = candidate & (values > threshold)
    radius = settings.morphology_radius
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask8 = mask.astype(np.uint8)
        mask8 = cv2.morphologyEx(mask8, cv2.MORPH_CLOSE, kernel)
        mask8 = cv2.morphologyEx(mask8, cv2.MORPH_OPEN, kernel)
        mask = mask8.astype(bool)
    return TissueMasks(tissue=fill_small_holes(mask, float(settings.max_hole_fraction)), foreground=candidate,
                       signal=signal)


def fill_small_holes(mask: np.ndarray, max_fraction: float) -> np.ndarray:
    """Fill enclosed holes (lumens, pale nuclei) up to ``max_fraction`` of the mask's area.

    Larger enclosed background (tears, gaps between fragments) stays background.
    """
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(holes.astype(np.uint8), connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] <= max_fraction * mask.size
    small[0] = False  # label 0 is everything that is not a hole
    return mask | small[labels]
