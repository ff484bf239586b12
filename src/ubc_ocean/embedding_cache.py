"""Per-slide embedding files, in the h5 layout CLAM/TRIDENT users already have.

    {paths.processed}/embeddings/{encoder cache name}__{tiling key}/{source}/{image_id}.h5
        features  float16 [N, D]
        coords    int32   [N, 2]   level-0 (x, y) of each tile
        tumour_fraction float32 [N] share of each tile its supplemental mask marks tumour (only for a training
                                   slide with a mask: stage 01's tile index column, rows as ``features``)
        attrs     encoder, weights_sha256, tile_size, magnification, slide_id, package version
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from ubc_ocean import __version__
from ubc_ocean.io_utils import atomic_path


def embedding_path(root: Path, source: str, image_id: str) -> Path:
    return root / source / f"{image_id}.h5"


TUMOUR_FRACTION = "tumour_fraction"


def write_embeddings(path: Path, features: np.ndarray, coords: np.ndarray, attrs: Mapping,
                     tumour_fraction: np.ndarray | None = None) -> None:
    """Write one slide's features and coords (and its tiles' tumour fractions, when given) atomically (temp
    file, then rename)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("features", data=np.asarray(features, dtype=np.float16))
        handle.create_dataset("coords", data=np.asarray(coords, dtype=np.int32).reshape(-1, 2))
        if tumour_fraction is not None:
            values = np.asarray(tumour_fraction, dtype=np.float32).reshape(-1)
            if len(values) != len(features):
                raise ValueError(f"{path}: {len(values)} tumour fractions for {len(features)} tiles")
            handle.create_dataset(TUMOUR_FRACTION, data=values)
        for key, value in {**attrs, "package_version": __version__}.items():
            handle.attrs[key] = "" if value is None else value


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(features [N, D], coords [N, 2], attrs)`` of one slide."""
    with h5py.File(path, "r") as handle:
        return handle["features"][:], handle["coords"][:], dict(handle.attrs)


def read_tumour_fraction(path: str | Path) -> np.ndarray | None:
    """One slide's tile tumour fractions [N] (rows as its features), or None when it has none (no mask, or
    a file written before they were recorded)."""
    with h5py.File(path, "r") as handle:
        return handle[TUMOUR_FRACTION][:] if TUMOUR_FRACTION in handle else None


def read_attrs(path: str | Path) -> dict:
    """One slide's attributes alone (no features read)."""
    with h5py.File(path, "r") as handle:
        return dict(handle.attrs)


def is_current(path: Path, tiles_fingerprint: str, made_with: Mapping[str, str] | None = None) -> bool:
    """Complete and made from the tile folder as it is now (files written before fingerprints were
    recorded are taken as current), and with the attributes ``made_with`` (e.g. the stain reference's
    sha256: a file without them is not current)."""
    if not is_complete(path):
        return False
    with h5py.File(path, "r") as handle:
        recorded = handle.attrs.get("tiles_fingerprint")
    return (recorded is None or str(recorded) == tiles_fingerprint) and made_with_attrs(path, made_with)


def made_with_attrs(path: Path, made_with: Mapping[str, str] | None) -> bool:
    """Whether a (complete) file's attributes hold every ``made_with`` value (nothing asked: true)."""
    if not made_with:
        return True
    attrs = read_attrs(path)
    return all(key in attrs and str(attrs[key]) == str(value) for key, value in made_with.items())


def is_complete(path: Path) -> bool:
    """Files appear only once written in full (atomic rename); also check they open."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            return "features" in handle and "coords" in handle
    except OSError:
        return False
