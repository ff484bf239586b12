"""Slide-level stain vectors and their clusters: the groups of ``folds.group_by=stain_cluster`` (stage 02).

A slide's stain vector comes from an evenly spaced sample of its tiles (up to :data:`TILES_PER_SLIDE`, in
index order): their tissue pixels pooled into one mosaic, on which torchstain's numpy Macenko normaliser
is fitted. Its fitted ``HERef`` (the hematoxylin and eosin optical-density directions, 3 numbers each) and
``maxCRef`` (the two stains' 99th-percentile concentrations) make 8 numbers. Where the fit fails (too little
tissue, a degenerate colour spread) the slide's mean optical density of tissue stands in for both stains
(direction and strength; ``fit`` says ``mean_od``). The vectors are standardised and clustered with k-means:
slides of one cluster look stained alike, as slides of one hospital do. Torch-free (stage 02 runs it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ubc_ocean import tile_store

log = logging.getLogger(__name__)
TILES_PER_SLIDE = 16        # tiles read per slide, evenly spaced in its index
MAX_PIXELS = 65536          # tissue pixels per slide the fit sees (an even stride over the mosaic)
MIN_PIXELS = 256            # fewer tissue pixels: no Macenko fit, the mean optical density instead
TRANSMITTED = 240           # torchstain's Io: the light through glass; brighter pixels are background
MIN_OD = 0.15               # torchstain's beta: a pixel below this optical density in any channel is not stain
DARK = 30                   # a pixel darker than this in every channel is black background or ink, not stain
COLUMNS = ["h_r", "h_g", "h_b", "e_r", "e_g", "e_b", "max_c_h", "max_c_e"]
MACENKO, MEAN_OD = "macenko", "mean_od"


def sample_tiles(folder: Path, n_tiles: int = TILES_PER_SLIDE) -> list[np.ndarray]:
    """Up to ``n_tiles`` of a complete slide folder's tiles (RGB uint8), evenly spaced in its index."""
    index = tile_store.read_index(folder)
    if index.empty:
        return []
    rows = np.unique(np.linspace(0, len(index) - 1, min(n_tiles, len(index))).round().astype(int))
    return [tile_store.read_tile(folder / str(index["file"].iloc[row])) for row in rows]


def optical_density(pixels: np.ndarray) -> np.ndarray:
    """Beer-Lambert optical density of RGB values ([..., 3] uint8), as torchstain computes it."""
    return -np.log((pixels.astype(float) + 1) / TRANSMITTED)


def tissue_pixels(tiles: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(tissue, foreground)``: the tiles' pixels as [N, 3] without black background (``foreground``), and of those
    the ones stained in every channel (``tissue``), each cut to at most :data:`MAX_PIXELS` by an even stride."""
    pixels = np.concatenate([tile.reshape(-1, 3) for tile in tiles]) if tiles else np.zeros((0, 3), np.uint8)
    foreground = pixels[pixels.max(axis=1) >= DARK]
    tissue = foreground[(optical_density(foreground) >= MIN_OD).all(axis=1)]
    return _strided(tissue), _strided(foreground)


def _strided(pixels: np.ndarray) -> np.ndarray:
    step = max(1, int(np.ceil(len(pixels) / MAX_PIXELS)))
    return pixels[::step]


def _macenko(tissue: np.ndarray) -> np.ndarray | None:
    """The 8 numbers of a Macenko fit on ``tissue`` ([N, 3] uint8), or None where the fit fails."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    normaliser = NumpyMacenkoNormalizer()
    try:
        with np.errstate(all="ignore"):
            normaliser.fit(tissue[None], Io=TRANSMITTED, beta=MIN_OD)
    except (np.linalg.LinAlgError, ValueError, IndexError):
        return None
    stains = np.asarray(normaliser.HERef, float)  # [3, 2]: hematoxylin and eosin OD directions
    stains = stains * np.where(stains.sum(axis=0) < 0, -1.0, 1.0)  # an eigenvector's sign is arbitrary
    vector = np.concatenate([stains.T.ravel(), np.asarray(normaliser.maxCRef, float)])
    return vector if np.isfinite(vector).all() else None


def stain_vector(tiles: list[np.ndarray]) -> tuple[np.ndarray, str]:
    """A slide's 8 stain numbers (:data:`COLUMNS`) from its tiles, and how they were found (``macenko``, or
    ``mean_od``: the mean optical density's direction for both stains and its length for both strengths)."""
    tissue, foreground = tissue_pixels(tiles)
    if len(tissue) >= MIN_PIXELS:
        vector = _macenko(tissue)
        if vector is not None:
            return vector, MACENKO
    pixels = tissue if len(tissue) else foreground
    mean = optical_density(pixels).mean(axis=0) if len(pixels) else np.zeros(3)
    length = float(np.linalg.norm(mean))
    unit = mean / length if length > 0 else mean
    return np.concatenate([unit, unit, [length, length]]), MEAN_OD


def slide_stain_vectors(folders: Mapping[str, Path], n_tiles: int = TILES_PER_SLIDE) -> pd.DataFrame:
    """``slide_id``, the 8 :data:`COLUMNS` and ``fit`` for each ``{slide_id: complete tile folder}``."""
    from tqdm.auto import tqdm

    rows = []
    for slide_id, folder in tqdm(folders.items(), desc="stain vectors", unit="slide", dynamic_ncols=True):
        vector, fit = stain_vector(sample_tiles(folder, n_tiles))
        rows.append({"slide_id": slide_id, **dict(zip(COLUMNS, vector.tolist(), strict=True)), "fit": fit})
    frame = pd.DataFrame(rows, columns=["slide_id", *COLUMNS, "fit"])
    fallbacks = int((frame["fit"] == MEAN_OD).sum())
    if fallbacks:
        log.warning("stain vectors: %d of %d slides had no Macenko fit (too little tissue or colour spread): "
                    "their mean optical density stands in", fallbacks, len(frame))
    return frame


def cluster_stain_vectors(vectors: pd.DataFrame, n_clusters: int, seed: int) -> np.ndarray:
    """k-means cluster (0..n_clusters-1) of each row's standardised :data:`COLUMNS`; fewer clusters than asked
    where there are fewer distinct vectors."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    values = vectors[COLUMNS].to_numpy(float)
    k = min(n_clusters, len(np.unique(values.round(12), axis=0)))
    if k < 2:
        return np.zeros(len(values), int)
    scaled = StandardScaler().fit_transform(values)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(scaled).astype(int)
