"""Synthetic TMA cores cut from a WSI (3rd place's idea): discs from its most tumour-dense areas, at the
target magnification, on white, to be tiled as TMAs and trained on as extra bags of their parent slide.

Where: each core is a square window of ``cells`` x ``cells`` cells of the slide's tile grid, the window whose
disc holds the most tumour (the supplemental mask's share of each cell) or, without a mask (or without
tumour in it), the most tissue (the tiler's mask); the next core takes the best window that overlaps no
core already chosen; a window whose disc is less than ``tiling.min_tissue_fraction`` tissue is never
chosen, so a small or sparse slide may give fewer cores than asked. The cells are read at the tile size,
in the tiler's one pass when its plan comes before it (:meth:`SlideTiler.read_also`), else after it
(:meth:`SlideTiler.read_cells`: a second decoding of a PNG without a usable thumbnail).

What: the window's central ``side`` x ``side`` pixels, inside a roughly circular disc (about 85% of the side,
slightly irregular edge, seeded per core) with the slide's background (black fill, glass) and everything
outside the disc set to white, as on a real TMA.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.synthetic.morphology import tma_core_mask
from ubc_ocean.tiling.grid import slide_seed
from ubc_ocean.tiling.masks import TumourMap
from ubc_ocean.tiling.tiler import CellGrid, SlideTiler
from ubc_ocean.tiling.tissue import background_mask

log = logging.getLogger(__name__)

TUMOUR_MASK = "tumour (supplemental mask)"
TISSUE_MASK = "tissue (tiling mask)"
WHITE = 255


def core_id(image_id: str, index: int) -> str:
    """The image id of a slide's ``index``-th synthetic core."""
    return f"{image_id}_core{index}"


@dataclass(frozen=True)
class CoreSite:
    """Where one core is cut: a window of ``cells`` x ``cells`` grid cells from level-0 ``(x, y)``."""

    index: int
    x: int
    y: int
    cells: int
    extent: int
    density: float  # mean tumour (or tissue) share over the window's disc
    density_source: str

    @property
    def side(self) -> int:
        """The window's level-0 side."""
        return self.cells * self.extent

    def boxes(self) -> list[tuple[int, int]]:
        """The level-0 corners of the window's cells, row-major."""
        return [(self.x + c * self.extent, self.y + r * self.extent)
                for r in range(self.cells) for c in range(self.cells)]

    def record(self, image_id: str) -> dict:
        """What the parent's ``slide.json`` says of this core."""
        return {"image_id": core_id(image_id, self.index), "x": self.x, "y": self.y, "side": self.side,
                "density": round(self.density, 4), "density_source": self.density_source}


def window_cells(side: int, tile_size: int) -> int:
    """Cells per side of the window a ``side``-pixel core is cut from (``side`` in target-magnification px)."""
    return max(1, math.ceil(side / tile_size))


def disc_kernel(cells: int) -> np.ndarray:
    """A normalised disc inscribed in a ``cells`` x ``cells`` square."""
    centre = (cells - 1) / 2
    yy, xx = np.mgrid[:cells, :cells]
    disc = ((yy - centre) ** 2 + (xx - centre) ** 2 <= (cells / 2) ** 2).astype(np.float32)
    return disc / disc.sum()


def window_scores(density: np.ndarray, cells: int) -> np.ndarray:
    """Mean ``density`` over the disc of every ``cells`` x ``cells`` window inside the grid: [r, c] for the
    window whose top-left cell is (r, c)."""
    rows, cols = density.shape
    if rows < cells or cols < cells:
        return np.zeros((0, 0), np.float32)
    full = cv2.filter2D(np.ascontiguousarray(density, np.float32), -1, disc_kernel(cells), anchor=(0, 0),
                        borderType=cv2.BORDER_CONSTANT)
    return full[: rows - cells + 1, : cols - cells + 1]


def choose_sites(density: CellGrid, tissue: np.ndarray, count: int, cells: int, min_tissue: float, seed: int,
                 source: str) -> list[CoreSite]:
    """Up to ``count`` non-overlapping windows, densest first, among those whose disc is at least
    ``min_tissue`` tissue (``tissue``: a grid like ``density``'s values) and holds some density. Windows of
    equal density go by their tissue share, then by a seeded jitter far below any real difference."""
    scores = window_scores(density.values, cells).astype(np.float64)
    if scores.size == 0:
        return []
    covered = window_scores(tissue, cells)
    rank = scores + 1e-3 * covered + 1e-9 * np.random.default_rng(seed).random(scores.shape)
    rank[(scores <= 0) | (covered < min_tissue)] = -np.inf
    sites: list[CoreSite] = []
    while len(sites) < count and np.isfinite(rank).any():
        row, col = np.unravel_index(int(np.argmax(rank)), rank.shape)
        x, y = density.box(int(row), int(col))
        sites.append(CoreSite(len(sites), x, y, cells, density.extent, float(scores[row, col]), source))
        rank[max(0, row - cells + 1): row + cells, max(0, col - cells + 1): col + cells] = -np.inf  # overlaps
    return sites


def density_grid(tissue: CellGrid, tumour: np.ndarray | None) -> tuple[CellGrid, str]:
    """The grid cores are chosen on: ``tumour`` (each cell's tumour share, a grid like ``tissue``'s) when it
    shows any tumour, else ``tissue``; and which of the two it is."""
    if tumour is not None and tumour.shape == tissue.values.shape and float(tumour.max(initial=0.0)) > 0:
        return CellGrid(tumour, tissue.x0, tissue.y0, tissue.extent), TUMOUR_MASK
    return tissue, TISSUE_MASK


class CoreCutter:
    """Collects the cells of a slide's core windows (in any order) and makes each core's image."""

    def __init__(self, sites: list[CoreSite], tile_size: int, side: int, slide_id: str, seed: int,
                 black_value: int, white_value: int):
        self.sites, self.tile_size, self.side = sites, tile_size, side
        self.slide_id, self.seed = slide_id, seed
        self.black_value, self.white_value = black_value, white_value
        window = sites[0].cells * tile_size if sites else 0
        self._canvases = [np.full((window, window, 3), WHITE, np.uint8) for _ in sites]
        self._where: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # box -> (site, row, col)
        for k, site in enumerate(sites):
            for i, box in enumerate(site.boxes()):  # row-major
                self._where.setdefault(box, []).append((k, *divmod(i, site.cells)))

    @property
    def boxes(self) -> set[tuple[int, int]]:
        """Every cell the cores need."""
        return set(self._where)

    def take(self, box: tuple[int, int], rgb: np.ndarray) -> None:
        """Paste one cell read at the tile size (copied: a reader may reuse its buffer)."""
        size = self.tile_size
        for k, r, c in self._where.get(box, ()):
            self._canvases[k][r * size: (r + 1) * size, c * size: (c + 1) * size] = rgb

    def images(self) -> list[tuple[CoreSite, np.ndarray]]:
        """Each core's ``side`` x ``side`` image: the window's centre, a disc of it, white around and
        wherever the slide showed background."""
        cores = []
        for site, canvas in zip(self.sites, self._canvases, strict=True):
            offset = (canvas.shape[0] - self.side) // 2
            crop = canvas[offset: offset + self.side, offset: offset + self.side]
            rng = np.random.default_rng(slide_seed(f"{self.slide_id}#core{site.index}", self.seed))
            keep = tma_core_mask(rng, self.side) & ~background_mask(crop, self.black_value, self.white_value)
            cores.append((site, np.where(keep[..., None], crop, np.uint8(WHITE))))
        return cores


def plan_cores(tiler: SlideTiler, settings: TilingSettings, tumour_map: TumourMap | None = None) -> CoreCutter:
    """Where ``tiler``'s slide gets its ``settings.synthetic_tmas_per_wsi`` cores, chosen on the tumour of its
    supplemental mask's ``tumour_map`` when there is one, else on the tiler's tissue mask; the cutter then
    collects their cells (``tiler.read_also(cutter.boxes, cutter.take)`` before the pass, or
    ``tiler.read_cells(cutter.boxes)`` after it)."""
    tissue = tiler.tissue_grid()
    tumour = None
    if tumour_map is not None:
        rows, cols = tissue.values.shape
        boxes = [tissue.box(r, c) for r in range(rows) for c in range(cols)]
        tumour = tumour_map.tile_fractions((tiler.reader.width, tiler.reader.height), boxes,
                                           tissue.extent).reshape(rows, cols)
    grid, source = density_grid(tissue, tumour)
    cells = window_cells(settings.synthetic_tma_side, settings.tile_size)
    wanted = settings.synthetic_tmas_per_wsi
    sites = choose_sites(grid, tissue.values, wanted, cells, float(settings.min_tissue_fraction), tiler.seed, source)
    if len(sites) < wanted:
        log.warning("%s: room for %d of %d synthetic cores (%d x %d cells each, on %s)", tiler.spec.slide_id,
                    len(sites), wanted, cells, cells, source)
    return CoreCutter(sites, settings.tile_size, settings.synthetic_tma_side, tiler.spec.slide_id, settings.seed,
                      settings.black_value, settings.white_value)
