"""Supplemental tumour masks: each tile's tumour fraction, from a mask read once, at low resolution.

A mask is an RGB PNG of any size stretched over its image (each axis scaled by image / mask size): tumour is
red (R > 127, G < 128, B < 128), stroma green, necrosis blue, anything else (black) unannotated. pyvips
streams the full-size mask once, turning each pixel into 1.0 (tumour) or 0.0 and averaging blocks of it
down to at most :data:`MAP_MAX_SIDE` pixels: a map of tumour shares. A tile's fraction is the exact area
integral of that piecewise-constant map over the tile's box (a summed-area table, interpolated
bilinearly), divided by the box's area; a box reaching past the mask counts the part outside as not tumour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAP_MAX_SIDE = 4096  # the tumour map's longest side: a 256-px tile of a 100k-px WSI spans about 10 map pixels


class MaskError(ValueError):
    """A supplemental mask that cannot be read or is not an RGB image."""


@dataclass(frozen=True)
class TumourMap:
    """Tumour share per map pixel, and the size of the mask it was averaged from (each map pixel covers
    ``factor`` x ``factor`` mask pixels)."""

    share: np.ndarray  # float32 [h, w] in [0, 1]
    mask_size: tuple[int, int]  # (width, height) of the mask file
    factor: int

    def tile_fractions(self, image_size: tuple[int, int], boxes: Sequence[tuple[int, int]], extent: int) -> np.ndarray:
        """The tumour fraction of each level-0 box ``(x, y)`` of side ``extent`` of an image of ``image_size``
        (width, height) over which the mask is stretched."""
        if not len(boxes):
            return np.zeros(0, np.float32)
        xy = np.asarray(boxes, dtype=np.float64).reshape(-1, 2)
        # level-0 -> mask pixels -> map pixels, per axis
        sx = self.mask_size[0] / float(image_size[0]) / self.factor
        sy = self.mask_size[1] / float(image_size[1]) / self.factor
        x0, x1 = xy[:, 0] * sx, (xy[:, 0] + extent) * sx
        y0, y1 = xy[:, 1] * sy, (xy[:, 1] + extent) * sy
        table = _summed_area(self.share)
        inside = (_integral(table, x1, y1) - _integral(table, x0, y1) - _integral(table, x1, y0)
                  + _integral(table, x0, y0))
        return np.clip(inside / ((x1 - x0) * (y1 - y0)), 0.0, 1.0).astype(np.float32)


def _summed_area(share: np.ndarray) -> np.ndarray:
    """``S[j, i]``: the sum of ``share[:j, :i]`` ([h + 1, w + 1], zeros on the first row and column)."""
    table = np.zeros((share.shape[0] + 1, share.shape[1] + 1), np.float64)
    table[1:, 1:] = share.astype(np.float64).cumsum(0).cumsum(1)
    return table


def _integral(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The integral of the map over ``[0, x) x [0, y)`` (map pixels, clipped to the map): the summed-area
    table is bilinear inside each cell of a piecewise-constant map, so interpolating it is exact."""
    height, width = table.shape[0] - 1, table.shape[1] - 1
    x, y = np.clip(x, 0, width), np.clip(y, 0, height)
    i, j = np.minimum(np.floor(x).astype(int), width - 1), np.minimum(np.floor(y).astype(int), height - 1)
    i, j = np.maximum(i, 0), np.maximum(j, 0)
    u, v = x - i, y - j
    return ((1 - u) * (1 - v) * table[j, i] + u * (1 - v) * table[j, i + 1]
            + (1 - u) * v * table[j + 1, i] + u * v * table[j + 1, i + 1])


def read_tumour_map(path: str | Path, max_side: int = MAP_MAX_SIDE) -> TumourMap:
    """Stream the mask at ``path`` once and average its tumour pixels down to at most ``max_side`` pixels
    (a whole-number shrink factor); raises :class:`MaskError` naming the file when it cannot."""
    import pyvips

    try:
        image = pyvips.Image.new_from_file(str(path), access="sequential", fail_on="error")
        if image.bands < 3:
            raise MaskError(f"supplemental mask {path}: {image.bands} band(s), expected RGB")
        if image.format != "uchar":
            image = image.cast("uchar")
        red, green, blue = image[0], image[1], image[2]
        tumour = ((red > 127) & (green < 128) & (blue < 128)) / 255.0  # 1.0 where tumour, as float
        factor = max(1, math.ceil(max(image.width, image.height) / max_side))
        if factor > 1:  # padded with zeros to whole blocks, so each map pixel averages exactly its block
            width, height = math.ceil(image.width / factor) * factor, math.ceil(image.height / factor) * factor
            tumour = tumour.embed(0, 0, width, height, extend="black").shrink(factor, factor)
        share = np.ndarray(buffer=tumour.cast("float").write_to_memory(), dtype=np.float32,
                           shape=(tumour.height, tumour.width))
    except pyvips.Error as err:
        raise MaskError(f"supplemental mask {path}: cannot read it ({' '.join(str(err).split())[:200]})") from None
    return TumourMap(share.copy(), (image.width, image.height), factor)
