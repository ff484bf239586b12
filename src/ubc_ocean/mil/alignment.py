"""CORAL feature alignment (Sun, Feng & Saenko, AAAI 2016): test tile embeddings moved onto the training
tiles' first and second moments before a model sees them.

Stage 04 (``mil.feature_alignment: coral``) counts the moments of every training tile
(:class:`TileStatistics`: per kind of image, count, sum and sum of outer products in float64, so streams
of any length merge exactly) and saves them beside the model; stage 05 counts the test tiles' as their
features arrive, and maps each test tile ``x`` (a row) to

    x' = (x - mu_t) Ct^{-1/2} Cs^{1/2} + mu_s,     C = cov + eps * mean(diag(cov)) * I,

(``t``: test, ``s``: training) whose mean is ``mu_s`` and whose covariance is ``Cs`` (exactly so as
``eps -> 0``). Matrix square roots are symmetric, by eigendecomposition with the eigenvalues clipped to a
small positive floor. NumPy only: no labels and no model are involved.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ubc_ocean.io_utils import atomic_path

log = logging.getLogger(__name__)

WSI, TMA, POOLED = "wsi", "tma", "all"
KINDS = (WSI, TMA)
CHUNK_ROWS = 4096  # tiles per float64 outer-product block: bounds the copy of a large bag
EIGEN_FLOOR = 1e-10  # eigenvalues clipped at this share of the largest (a singular covariance stays invertible)
_FORMAT = 1


@dataclass
class Moments:
    """Streaming first and second moments of tile embeddings: count, sum [D] and sum of outer products
    [D, D], all float64."""

    count: int
    total: np.ndarray
    outer: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> Moments:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @property
    def dim(self) -> int:
        return int(self.total.shape[0])

    def add(self, features: np.ndarray) -> None:
        """Count the rows of ``features`` [N, D] (any float dtype)."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features of shape {features.shape}, expected [N, {self.dim}]")
        for start in range(0, len(features), CHUNK_ROWS):
            block = features[start : start + CHUNK_ROWS].astype(np.float64)
            self.count += len(block)
            self.total += block.sum(axis=0)
            self.outer += block.T @ block

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total, self.outer + other.outer)

    @property
    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no tiles counted: the mean is undefined")
        return self.total / self.count

    def covariance(self) -> np.ndarray:
        """The unbiased covariance [D, D] (as ``np.cov`` of the rows); at least two tiles are needed."""
        if self.count < 2:
            raise ValueError(f"{self.count} tile(s) counted: a covariance needs at least 2")
        mean = self.mean
        cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return (cov + cov.T) / 2


class TileStatistics:
    """The :class:`Moments` of the tiles of WSIs and of TMAs, apart; :attr:`pooled` is their sum."""

    def __init__(self, dim: int, by_kind: Mapping[str, Moments] | None = None):
        self.by_kind = {kind: Moments.empty(dim) for kind in KINDS} if by_kind is None else dict(by_kind)
        if set(self.by_kind) != set(KINDS) or any(m.dim != dim for m in self.by_kind.values()):
            raise ValueError(f"tile statistics need the kinds {KINDS}, each {dim} wide")
        self.dim = dim

    def add(self, features: np.ndarray, is_tma: bool) -> None:
        self.by_kind[TMA if is_tma else WSI].add(features)

    @property
    def pooled(self) -> Moments:
        return self.by_kind[WSI] + self.by_kind[TMA]

    def counts(self) -> dict[str, int]:
        """Tiles counted: ``{"wsi": n, "tma": n, "all": n}``."""
        counts = {kind: moments.count for kind, moments in self.by_kind.items()}
        return {**counts, POOLED: sum(counts.values())}

    def side(self, kind: str, by_kind: bool, min_tiles: int) -> tuple[str, Moments]:
        """The moments that stand for ``kind``'s tiles: its own with ``by_kind`` when it has at least
        ``min_tiles`` of them, else the pooled ones; returns ``(which, moments)``."""
        if by_kind and self.by_kind[kind].count >= min_tiles:
            return kind, self.by_kind[kind]
        return POOLED, self.pooled

    def save(self, path: Path) -> Path:
        """Write an ``.npz`` atomically (``format``, and per kind ``{kind}_count``, ``_sum``, ``_outer``)."""
        arrays: dict[str, np.ndarray] = {"format": np.array(_FORMAT)}
        for kind, moments in self.by_kind.items():
            arrays |= {f"{kind}_count": np.array(moments.count), f"{kind}_sum": moments.total,
                       f"{kind}_outer": moments.outer}
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> TileStatistics:
        """Read :meth:`save`'s file; ``OSError`` when it cannot be read, ``ValueError`` when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format"]) != _FORMAT:
                    raise ValueError(f"format {int(data['format'])}, expected {_FORMAT}")
                kinds = {kind: Moments(int(data[f"{kind}_count"]), data[f"{kind}_sum"].astype(np.float64),
                                       data[f"{kind}_outer"].astype(np.float64)) for kind in KINDS}
        except (KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:  # an array missing, or not an npz
            raise ValueError(f"{path} is not a tile statistics file ({err})") from None
        dim = kinds[WSI].dim
        if any(m.outer.shape != (dim, dim) or m.total.shape != (dim,) or m.count < 0 for m in kinds.values()):
            raise ValueError(f"{path} is not a tile statistics file (inconsistent shapes)")
        return cls(dim, kinds)


class AffineMap(NamedTuple):
    """``x -> x @ matrix + offset`` on rows of tile embeddings."""

    matrix: np.ndarray  # [D, D]
    offset: np.ndarray  # [D]

    def apply(self, features: np.ndarray) -> np.ndarray:
        """The mapped rows, float32."""
        return (np.asarray(features, dtype=np.float64) @ self.matrix + self.offset).astype(np.float32)


def regularised_covariance(moments: Moments, eps: float) -> np.ndarray:
    """``cov + eps * mean(diag(cov)) * I``: a ridge scaled to the features' own variance."""
    cov = moments.covariance()
    return cov + eps * float(np.mean(np.diag(cov))) * np.eye(moments.dim)


def _symmetric_powers(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(M^{1/2}, M^{-1/2})`` of a symmetric positive semi-definite matrix, its eigenvalues clipped to
    ``EIGEN_FLOOR`` times the largest."""
    values, vectors = np.linalg.eigh(matrix)
    floor = EIGEN_FLOOR * max(float(values.max()), np.finfo(np.float64).tiny)
    root = np.sqrt(np.clip(values, floor, None))
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def coral_transform(source: Moments, target: Moments, eps: float) -> AffineMap:
    """The affine map ``(A, b)`` that carries the ``target`` tiles onto the ``source`` moments:
    ``x' = (x - mu_t) Ct^{-1/2} Cs^{1/2} + mu_s``, i.e. ``A = Ct^{-1/2} Cs^{1/2}``, ``b = mu_s - mu_t A``,
    with ``C = cov + eps * mean(diag(cov)) * I`` (``eps >= 0``). Each side needs two tiles or more."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if source.dim != target.dim:
        raise ValueError(f"source tiles are {source.dim} wide, target tiles {target.dim}")
    source_root, _ = _symmetric_powers(regularised_covariance(source, eps))
    _, target_inverse_root = _symmetric_powers(regularised_covariance(target, eps))
    matrix = target_inverse_root @ source_root
    return AffineMap(matrix, source.mean - target.mean @ matrix)


@dataclass(frozen=True)
class CoralAlignment:
    """One affine map per kind of image (the same map for both unless ``by_kind``), and which moments made
    each: ``sides[kind] = (source side, target side)``, a kind or ``"all"``."""

    maps: dict[str, AffineMap]
    sides: dict[str, tuple[str, str]]

    def apply(self, features: np.ndarray, is_tma: bool) -> np.ndarray:
        return self.maps[TMA if is_tma else WSI].apply(features)


def coral_alignment(source: TileStatistics, target: TileStatistics, eps: float, by_kind: bool = False,
                    min_tiles: int = 2) -> CoralAlignment:
    """The CORAL maps from ``target`` onto ``source``: pooled, or with ``by_kind`` one per kind of image,
    each side taking the pooled moments where it has fewer than ``min_tiles`` tiles of that kind."""
    maps, sides = {}, {}
    for kind in KINDS:
        source_side, source_moments = source.side(kind, by_kind, min_tiles)
        target_side, target_moments = target.side(kind, by_kind, min_tiles)
        sides[kind] = (source_side, target_side)
        reused = next((maps[k] for k in maps if sides[k] == sides[kind]), None)
        maps[kind] = reused if reused is not None else coral_transform(source_moments, target_moments, eps)
    return CoralAlignment(maps, sides)


CORAL = "coral"


@dataclass(frozen=True)
class CoralSettings:
    """How a model aligns its test tiles (``mil.coral_*``), as its completion record keeps them: stage 05
    applies what training recorded, whatever its own config says."""

    eps: float
    by_kind: bool
    min_tiles: int

    @classmethod
    def from_config(cls, mil_cfg: Mapping) -> CoralSettings | None:
        """A model's resolved ``mil`` section (``model_training_config``): None with ``feature_alignment: none``."""
        if mil_cfg["feature_alignment"] != CORAL:
            return None
        return cls(float(mil_cfg["coral_eps"]), bool(mil_cfg["coral_by_kind"]), int(mil_cfg["coral_min_tiles"]))

    def record(self, file: str, source: TileStatistics) -> dict:
        """The completion record's ``feature_alignment`` entry: method, settings, file and tiles counted."""
        return {"method": CORAL, "file": file, "eps": self.eps, "by_kind": self.by_kind, "min_tiles": self.min_tiles,
                "tiles": source.counts()}

    @classmethod
    def from_record(cls, entry: object) -> CoralSettings:
        """Read :meth:`record`'s entry back; ``ValueError`` naming what is wrong with it."""
        if not isinstance(entry, Mapping) or entry.get("method") != CORAL:
            raise ValueError(f"feature_alignment {entry!r} is not a CORAL record (method {CORAL!r})")
        try:
            settings = cls(float(entry["eps"]), bool(entry["by_kind"]), int(entry["min_tiles"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"feature_alignment {entry!r} lacks a valid eps, by_kind or min_tiles ({err})") from None
        if not settings.eps > 0 or settings.min_tiles < 2:
            raise ValueError(f"feature_alignment {entry!r}: eps must be > 0 and min_tiles >= 2")
        return settings

    def alignment(self, source: TileStatistics, target: TileStatistics) -> CoralAlignment:
        return coral_alignment(source, target, self.eps, self.by_kind, self.min_tiles)
