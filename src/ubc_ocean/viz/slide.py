"""One slide's heatmap picture, from files already on disk: the embeddings' coordinates, the thumbnail (or
the image shrunk, for TMAs without one) and the trained checkpoints. Nothing is tiled again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ubc_ocean import embedding_cache, tile_store
from ubc_ocean.slides.reader import open_slide, sorted_boxes
from ubc_ocean.sources import SlideFiles
from ubc_ocean.viz.overlay import attention_heatmap, ranked_tiles
from ubc_ocean.viz.relevance import Relevance, ensemble_relevance

VIEW_MAX_SIDE = 768
TILE_PREVIEW = 128  # pixels per side of a most / least attended tile in the picture
STRIP_GAP = 12  # white pixels between two tiles of a strip
IN_MEMORY_MAX_PIXELS = 64_000_000  # a TMA without thumbnail is decoded whole for its view


@dataclass
class SlideData:
    """What a heatmap needs of one slide, in memory."""

    files: SlideFiles
    view: np.ndarray  # RGB, the whole slide
    slide_size: tuple[int, int]  # level-0 (width, height)
    coords: np.ndarray  # [N, 2] level-0
    bag: torch.Tensor  # [N, D] float32

    def tiles(self, index: Sequence[int], size: int = TILE_PREVIEW) -> list[np.ndarray]:
        """The tiles at rows ``index`` of the bag: read from the tile store when the slide has one, else cut
        from the image (one decoding pass for a PNG)."""
        if len(index) == 0:
            return []
        boxes = [(int(x), int(y)) for x, y in self.coords[list(index)]]
        if self.files.tiles is not None:
            rows = tile_store.read_index(self.files.tiles).set_index(["x", "y"])["file"]
            return [tile_store.read_tile(self.files.tiles / rows.loc[box]) for box in boxes]
        with open_slide(self.files.image, in_memory_max_pixels=IN_MEMORY_MAX_PIXELS) as reader:
            read = dict(reader.read_boxes(sorted_boxes(set(boxes)), self.files.extent, size))
        return [read[box] for box in boxes]


def low_resolution_view(image: Path, thumbnail: Path | None, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``(RGB view of the whole slide, level-0 (width, height))``: from the thumbnail when it stands for the
    image, else the image shrunk (a TMA is decoded whole, a large PNG streams past once)."""
    with open_slide(image, thumbnail=thumbnail, in_memory_max_pixels=IN_MEMORY_MAX_PIXELS) as reader:
        return reader.low_resolution(max_side), (reader.width, reader.height)


def load_slide(files: SlideFiles, max_side: int = VIEW_MAX_SIDE) -> SlideData:
    """Read the slide's coordinates and features and make its low-resolution view."""
    features, coords, _ = embedding_cache.read_embeddings(files.embeddings)
    view, size = low_resolution_view(files.image, files.thumbnail, max_side)
    bag = torch.from_numpy(features.astype(np.float32))
    return SlideData(files, view, size, np.asarray(coords).reshape(-1, 2), bag)


def explain(data: SlideData, checkpoints: Mapping[str, Sequence[Path]]) -> dict[str, Relevance]:
    """Every model's relevance of the slide's tiles (models without checkpoints are left out)."""
    return {name: ensemble_relevance(paths, data.bag) for name, paths in checkpoints.items() if paths}


def tile_strip(pictures: Sequence[np.ndarray | None], size: int = TILE_PREVIEW, gap: int = STRIP_GAP) -> np.ndarray:
    """The pictures side by side, each resized to ``size`` x ``size``, ``gap`` white pixels apart (None: an
    empty white slot), as one RGB image."""
    import cv2

    strip = np.full((size, len(pictures) * (size + gap) - gap, 3), 255, np.uint8)
    for slot, picture in enumerate(pictures):
        if picture is not None:
            rgb = np.asarray(picture)[..., :3]
            if rgb.shape[:2] != (size, size):
                rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
            strip[:, slot * (size + gap) : slot * (size + gap) + size] = rgb
    return strip


def slide_figure(data: SlideData, relevances: Mapping[str, Relevance], classes: Sequence[str], n_tiles: int = 3):
    """A matplotlib figure: the plain view on the left; per model a row with the heatmap, then its
    ``n_tiles`` most and ``n_tiles`` least relevant tiles side by side (one strip of tiles per row: a
    figure of a few axes draws in a fraction of the time of one with an axes per tile)."""
    import matplotlib.pyplot as plt

    rows = max(1, len(relevances))
    fig = plt.figure(figsize=(2.0 * (2 + 2 * n_tiles) + 1.5, 2.4 * rows + 0.6))
    grid = fig.add_gridspec(rows, 3, width_ratios=[2.5, 2.5, 2 * n_tiles])
    plain = fig.add_subplot(grid[:, 0])
    plain.imshow(data.view)
    plain.set_title(f"{data.files.slide_id}\ntrue: {data.files.label or '?'}", fontsize=9)
    plain.axis("off")
    ranks = {name: ranked_tiles(rel.values, n_tiles) for name, rel in relevances.items()}
    wanted = sorted({int(i) for top, bottom in ranks.values() for i in (*top, *bottom)})
    pictures = dict(zip(wanted, data.tiles(wanted), strict=True))  # one read for every model's tiles
    for row, (name, rel) in enumerate(relevances.items()):
        ax = fig.add_subplot(grid[row, 1])
        ax.imshow(attention_heatmap(data.view, data.coords, rel.values, data.files.extent, data.slide_size))
        ax.set_title(f"{name} ({rel.method})\npred {classes[rel.predicted]} p={rel.probs[rel.predicted]:.2f}",
                     fontsize=8)
        ax.axis("off")
        top, bottom = ranks[name]
        slots = [*top, *[None] * (n_tiles - len(top)), *bottom, *[None] * (n_tiles - len(bottom))]
        strip_ax = fig.add_subplot(grid[row, 2])
        strip_ax.imshow(tile_strip([None if i is None else pictures[int(i)] for i in slots]))
        for slot, index in enumerate(slots):
            if index is not None:
                kind = "most" if slot < n_tiles else "least"
                centre = slot * (TILE_PREVIEW + STRIP_GAP) + TILE_PREVIEW / 2
                strip_ax.text(centre, -4, f"{kind} {rel.values[index]:.2f}", ha="center", va="bottom", fontsize=7,
                              color="firebrick" if kind == "most" else "navy")
        strip_ax.axis("off")
    fig.suptitle("tile colour: relevance rescaled to [0, 1] per model, blue least, red most", fontsize=9)
    fig.tight_layout()
    return fig
