"""Tiles of five planted textures under random colour, written as stage 01/02 would leave them (tile
folders, manifest, folds): the data of the encoder-adaptation tests.

A tile's class is its texture (fine dots, large blobs, stripes at a random angle, a checkerboard, smooth
noise); its colours (ink and paper) are drawn at random for every tile. An untrained network's features
follow colour as much as texture; an encoder taught invariance to colour by self-supervision with colour
jitter should sort the tiles by texture, which a kNN probe of held-out tiles measures.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ubc_ocean import layout, tile_store

TEXTURES = ("dots", "blobs", "stripes", "checker", "smooth")


def texture_tile(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 RGB tile of ``texture`` in random ink and paper colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if texture == "dots":
        pattern = (rng.random((size, size)) < 0.12).astype(np.float32)
    elif texture == "blobs":
        pattern = np.zeros((size, size), np.float32)
        for _ in range(3):
            cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 7, size / 5)
            pattern[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = 1.0
    elif texture == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(5, 7)
        pattern = (np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period) > 0).astype(np.float32)
    elif texture == "checker":
        cell = int(rng.integers(3, 5))
        pattern = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    else:
        pattern = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), size / 8)
        pattern = (pattern - pattern.min()) / max(float(np.ptp(pattern)), 1e-6)
    ink, paper = rng.uniform(0, 110, 3), rng.uniform(150, 255, 3)  # any hue, always legible
    rgb = paper[None, None, :] * (1 - pattern[..., None]) + ink[None, None, :] * pattern[..., None]
    return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)


def write_texture_data(cfg: Mapping, slides_per_class: int, tiles_per_slide: int, seed: int = 0,
                       n_folds: int = 3) -> pd.DataFrame:
    """Training slides of the five textures (one class each, ``data.classes`` in order), as tile folders,
    manifest and folds under ``cfg``'s paths; returns the manifest."""
    rng = np.random.default_rng(seed)
    size = int(cfg["tiling"]["tile_size"])
    classes = list(cfg["data"]["classes"])
    rows = []
    for c, texture in enumerate(TEXTURES):
        for s in range(slides_per_class):
            image_id = f"{c}{s:03d}"
            folder = layout.slide_tiles_dir(cfg, "train", image_id)
            folder.mkdir(parents=True, exist_ok=True)
            index = []
            for t in range(tiles_per_slide):
                name = tile_store.tile_file_name(t * size, 0, "png")
                cv2.imwrite(str(folder / name), cv2.cvtColor(texture_tile(texture, size, rng), cv2.COLOR_RGB2BGR))
                index.append({"file": name, "x": t * size, "y": 0, "extent": size, "magnification": 20.0,
                              "tissue_fraction": 1.0, "blur_score": 1.0})
            tile_store.write_index(folder, index)
            tile_store.write_slide_info(folder, {"label": classes[c]}, None)
            rows.append({"slide_id": f"train/{image_id}", "source": "train", "image_id": image_id,
                         "label": classes[c], "is_tma": False, "group": image_id, "n_tiles": tiles_per_slide,
                         "provenance": "competition", "tiling_key": tile_store.tiling_key(cfg),
                         "parent_image_id": "", "fold": s % n_folds})
    table = pd.DataFrame(rows)
    processed = Path(cfg["paths"]["processed"])
    processed.mkdir(parents=True, exist_ok=True)
    table.drop(columns="fold").to_csv(layout.manifest_path(cfg), index=False)
    table[["slide_id", "image_id", "source", "label", "is_tma", "fold", "parent_image_id"]].to_csv(
        layout.folds_path(cfg), index=False)
    return table


def probe_tiles(per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out tiles ``[N, S, S, 3]`` and their texture index, drawn apart from any training tile."""
    rng = np.random.default_rng(10_000 + seed)
    tiles = [texture_tile(texture, size, rng) for texture in TEXTURES for _ in range(per_class)]
    return np.stack(tiles), np.repeat(np.arange(len(TEXTURES)), per_class)
