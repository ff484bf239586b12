"""Per-tile values drawn over a slide's low-resolution view: the picture behind every attention heatmap."""

from __future__ import annotations

import numpy as np

DEFAULT_CMAP = "jet"


def normalise(values: np.ndarray) -> np.ndarray:
    """``values`` rescaled to [0, 1] (min -> 0, max -> 1); all equal -> all 0.5; NaN stays NaN."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.full(values.shape, np.nan)
    low, high = finite.min(), finite.max()
    if high - low <= 0:
        return np.where(np.isfinite(values), 0.5, np.nan)
    return (values - low) / (high - low)


def tile_rectangles(
    coords: np.ndarray, extent: int, slide_size: tuple[int, int], view_size: tuple[int, int]
) -> np.ndarray:
    """Each tile's ``[x0, y0, x1, y1)`` in view pixels (at least one pixel wide), for level-0 ``coords``
    [N, 2] of ``extent``-sided tiles on a ``slide_size`` (width, height) slide shown ``view_size`` large."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    scale = np.array([view_size[0] / slide_size[0], view_size[1] / slide_size[1]])
    start = np.floor(coords * scale).astype(np.int64)
    stop = np.maximum(start + 1, np.floor((coords + extent) * scale).astype(np.int64))
    limit = np.array(view_size)
    return np.concatenate([np.clip(start, 0, limit), np.clip(stop, 0, limit)], axis=1)


def heat_grid(
    coords: np.ndarray, values: np.ndarray, extent: int, slide_size: tuple[int, int], view_size: tuple[int, int]
) -> np.ndarray:
    """A float [height, width] map of the view: each tile's value over its rectangle, NaN where no tile lies
    (a pixel two tiles share takes the later tile's value)."""
    grid = np.full((view_size[1], view_size[0]), np.nan)
    for (x0, y0, x1, y1), value in zip(tile_rectangles(coords, extent, slide_size, view_size), values, strict=True):
        grid[y0:y1, x0:x1] = value
    return grid


def attention_heatmap(
    view: np.ndarray,
    coords: np.ndarray,
    values: np.ndarray,
    extent: int,
    slide_size: tuple[int, int],
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
    rescale: bool = True,
) -> np.ndarray:
    """The RGB ``view`` (uint8 [h, w, 3], the whole ``slide_size`` slide) with each tile tinted by its value.

    ``values`` [N] belong to the tiles at level-0 ``coords`` [N, 2] (side ``extent``); they are rescaled to
    [0, 1] (``rescale``; else taken as they are, clipped) and mapped through ``cmap``, blended with
    weight ``alpha``. Pixels outside every tile keep the view's own colour."""
    import matplotlib

    view = np.asarray(view, dtype=np.uint8)
    if view.ndim != 3 or view.shape[2] != 3:
        raise ValueError(f"view must be RGB [h, w, 3], got shape {view.shape}")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) != len(np.asarray(coords).reshape(-1, 2)):
        raise ValueError(f"{len(values)} values for {len(np.asarray(coords).reshape(-1, 2))} tiles")
    levels = normalise(values) if rescale else np.clip(values, 0.0, 1.0)
    grid = heat_grid(coords, levels, extent, slide_size, (view.shape[1], view.shape[0]))
    covered = np.isfinite(grid)
    colours = matplotlib.colormaps[cmap](np.nan_to_num(grid[covered]))[:, :3] * 255.0
    out = view.copy()
    out[covered] = np.round((1.0 - alpha) * view[covered] + alpha * colours).astype(np.uint8)
    return out


def ranked_tiles(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest values (highest first) and the ``k`` lowest (lowest first); a bag with
    fewer than ``2k`` tiles splits them, never showing a tile on both sides."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    k = max(0, min(k, len(order) // 2 if len(order) > 1 else len(order)))
    return order[:k], order[::-1][:k] if len(order) > 1 else order[:0]
