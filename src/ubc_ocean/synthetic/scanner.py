"""Scanner and handling artefacts laid over a rendered slide: pen marks, defocus blur, JPEG compression.

Each works on the tissue only: the caller's background (black WSI fill, white TMA glass) stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyvips
from scipy import ndimage as ndi

# Marker inks as optical densities (R, G, B): green, blue, black.
PEN_INKS = ((1.4, 0.35, 1.1), (1.3, 0.9, 0.2), (1.3, 1.3, 1.2))


@dataclass(frozen=True)
class Artefacts:
    """What to lay over one slide: nothing by default (0 = off for each)."""

    blur_sigma: float = 0.0  # Gaussian defocus, px
    jpeg_quality: int = 0  # 1-100: one JPEG round trip at this quality
    pen_strokes: int = 0  # marker strokes across the tissue

    @property
    def any(self) -> bool:
        return self.blur_sigma > 0 or self.jpeg_quality > 0 or self.pen_strokes > 0


def pen_marks(rgb: np.ndarray, tissue: np.ndarray, rng: np.random.Generator, strokes: int) -> None:
    """Draw ``strokes`` wavy marker lines (one ink per slide, ~1% of the short side wide) onto the tissue."""
    h, w = tissue.shape
    ys, xs = np.nonzero(tissue)
    if ys.size == 0 or strokes <= 0:
        return
    ink = np.asarray(PEN_INKS[rng.integers(len(PEN_INKS))], np.float32)
    seeds = np.ones((h, w), bool)
    for _ in range(strokes):
        start = rng.integers(ys.size)
        y, x = float(ys[start]), float(xs[start])
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(int(0.5 * min(h, w))):  # one-pixel steps, gently turning
            heading += rng.normal(0, 0.05)
            y, x = y + np.sin(heading), x + np.cos(heading)
            if not (0 <= y < h and 0 <= x < w):
                break
            seeds[int(y), int(x)] = False
    half_width = max(1.5, 0.006 * min(h, w))
    line = ndi.distance_transform_edt(seeds) <= half_width
    line &= tissue
    strength = np.float32(rng.uniform(0.6, 1.0))
    transmit = np.exp(-ink * strength)  # Beer-Lambert: the ink multiplies what is below it
    rgb[line] = np.rint(rgb[line] * transmit).astype(np.uint8)


def defocus(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``sigma`` px in each channel (out of focus scan)."""
    return ndi.gaussian_filter(rgb.astype(np.float32), (sigma, sigma, 0)).round().clip(0, 255).astype(np.uint8)


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at ``quality`` and decode again (block artefacts, chroma loss)."""
    image = pyvips.Image.new_from_array(np.ascontiguousarray(rgb), interpretation="srgb")
    data = image.jpegsave_buffer(Q=int(quality))
    return pyvips.Image.new_from_buffer(data, "").numpy()[..., :3]


def apply_artefacts(rgb: np.ndarray, tissue: np.ndarray, artefacts: Artefacts, rng: np.random.Generator) -> None:
    """Pen marks, then defocus, then JPEG, in place; pixels outside ``tissue`` keep their value."""
    if not artefacts.any:
        return
    background = rgb[~tissue].copy()
    if artefacts.pen_strokes > 0:
        pen_marks(rgb, tissue, rng, artefacts.pen_strokes)
    if artefacts.blur_sigma > 0:
        rgb[:] = defocus(rgb, artefacts.blur_sigma)
    if artefacts.jpeg_quality > 0:
        rgb[:] = jpeg_round_trip(rgb, artefacts.jpeg_quality)
    rgb[~tissue] = background
