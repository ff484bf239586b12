"""Tile planning: a level-0 grid, each cell's tissue fraction from the mask, selection and the cap."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class TilePlan:
    """Which level-0 boxes to cut. ``extent`` is a box's level-0 side; boxes are sorted row-major."""

    xs: np.ndarray
    ys: np.ndarray
    tissue_fraction: np.ndarray
    extent: int
    fallback: str = ""  # why the plan is not the plain tissue-threshold selection, if it is not

    def __len__(self) -> int:
        return len(self.xs)

    @property
    def boxes(self) -> list[tuple[int, int]]:
        return list(zip(self.xs.tolist(), self.ys.tolist(), strict=True))


def slide_seed(slide_id: str, seed: int) -> int:
    """A stable per-slide seed (independent of process, order and worker count)."""
    return zlib.crc32(f"{seed}:{slide_id}".encode())


def grid_origin(width: int, height: int, extent: int) -> tuple[int, int]:
    """Level-0 (x, y) of the first grid cell: the complete cells are centred on the slide, so the part
    no cell covers is split between opposite edges (a round TMA core loses less tissue than with the
    whole remainder on its right and bottom)."""
    return (width % extent) // 2, (height % extent) // 2


def cell_fractions(mask: np.ndarray, width: int, height: int, extent: int) -> np.ndarray:
    """Fraction of each ``extent``-sized level-0 grid cell covered by ``mask`` (a low-resolution view of
    the whole ``width`` x ``height`` slide).

    Returns [rows, cols] for the complete cells of the centred grid (:func:`grid_origin`): the mask's
    part that covers them is area-averaged onto the grid (cv2's INTER_AREA), which handles cells of
    fractional mask size.
    """
    cols, rows = width // extent, height // extent
    if cols == 0 or rows == 0:
        return np.zeros((rows, cols), dtype=np.float32)
    mh, mw = mask.shape
    ox, oy = grid_origin(width, height, extent)
    x0, y0 = min(mw - 1, round(ox * mw / width)), min(mh - 1, round(oy * mh / height))
    x1 = max(x0 + 1, min(mw, round((ox + cols * extent) * mw / width)))
    y1 = max(y0 + 1, min(mh, round((oy + rows * extent) * mh / height)))
    region = np.ascontiguousarray(mask[y0:y1, x0:x1], dtype=np.float32)
    return cv2.resize(region, (cols, rows), interpolation=cv2.INTER_AREA)


def _cap(order: np.ndarray, max_tiles: int, sampling: str, seed: int) -> np.ndarray:
    if max_tiles <= 0 or len(order) <= max_tiles:
        return order
    if sampling == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(order, size=max_tiles, replace=False))
    if sampling == "stratified":
        picks = np.linspace(0, len(order) - 1, max_tiles).round().astype(int)
        return order[picks]
    raise ValueError(f"unknown tiling.sampling {sampling!r} (random | stratified)")


def plan_tiles(
    tissue: np.ndarray,
    foreground: np.ndarray,
    width: int,
    height: int,
    extent: int,
    min_fraction: float,
    max_tiles: int,
    sampling: str,
    seed: int,
    fallback_tiles: int = 16,
    offset: tuple[int, int] = (0, 0),
) -> TilePlan:
    """Select grid cells whose tissue fraction reaches ``min_fraction``, capped at ``max_tiles``.

    The masks cover ``width`` x ``height`` level-0 pixels starting at ``offset`` (a view of part of the
    slide); the boxes are given in the slide's level-0 coordinates.

    If none qualifies, fall back to the cells most covered by tissue, else by non-background pixels,
    and say so in ``fallback``; an all-background slide yields an empty plan.
    """
    fractions = cell_fractions(tissue, width, height, extent)
    flat = fractions.ravel()
    chosen = np.flatnonzero(flat >= min_fraction)
    fallback = ""
    if chosen.size == 0:
        score, why = flat, "no tile reached the tissue fraction; kept the most tissue-covered tiles"
        if not np.any(score > 0):
            score = cell_fractions(foreground, width, height, extent).ravel()
            why = "tissue mask empty; kept the tiles with most non-background pixels"
        ranked = np.argsort(-score, kind="stable")
        limit = fallback_tiles if max_tiles <= 0 else min(fallback_tiles, max_tiles)
        chosen = np.sort(ranked[: limit][score[ranked[:limit]] > 0])
        fallback = why if chosen.size else ""
    chosen = _cap(chosen, max_tiles, sampling, seed)
    cols = fractions.shape[1] if fractions.ndim == 2 and fractions.size else 1
    rows_idx, cols_idx = np.divmod(chosen, cols)
    ox, oy = grid_origin(width, height, extent)
    return TilePlan(
        xs=(offset[0] + ox + cols_idx * extent).astype(np.int64),
        ys=(offset[1] + oy + rows_idx * extent).astype(np.int64),
        tissue_fraction=flat[chosen] if flat.size else np.zeros(0, np.float32),
        extent=extent,
        fallback=fallback,
    )
