"""H&E stain normalisation with torchstain's numpy backend (no torch): a reference fitted once on training
tiles, and a batch transform that maps every tile's stain onto it (``features.stain_normalisation``).

Methods: ``macenko`` (each tile's haematoxylin and eosin optical-density vectors and concentration range,
re-rendered with the reference's; Macenko et al., ISBI 2009) and ``reinhard`` (each tile's LAB channel means
and standard deviations set to the reference's; Reinhard et al., 2001).

A :class:`StainReference` is a small JSON record (method, fitted parameters, the tiles it was fitted on,
torchstain's version, the sha256 of its canonical JSON): stage 03 writes it beside the training embeddings,
stage 04 copies it into the run folder and stage 05 normalises the test tiles with that copy.

Near-black pixels (``max(R, G, B) < black_value``, the WSIs' black fill; ``tiling.black_value``) are no stain:
they are left out of the fit and of every tile's statistics, and left as they are. A tile with too little
stain to fit (a blank or background tile: Macenko needs stained pixels, Reinhard a spread of colours) is
left unchanged and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ubc_ocean.io_utils import atomic_write_text

log = logging.getLogger(__name__)

METHODS = ("macenko", "reinhard")
REFERENCE_FILE = "stain_reference.json"  # in the embeddings folder (stage 03) and the run folder (stage 04)
FORMAT = 1
IO = 240  # Macenko's transmitted light intensity (torchstain's default)
BETA = 0.15  # Macenko: pixels with an optical density below this in any channel are background
ALPHA = 1.0  # Macenko: percentile of the stain angles taken as the extreme stain vectors
MIN_STAIN_FRACTION = 0.01  # a tile with fewer usable pixels than this share is left unchanged
MIN_FIT_PIXELS = 1000  # a reference mosaic with fewer stained pixels is refused
MAX_FIT_PIXELS = 1 << 22  # the reference mosaic's pixels are subsampled (seeded) beyond this


class StainError(ValueError):
    """A tile (or reference mosaic) that has too little stain to fit."""


def torchstain_version() -> str:
    """The installed torchstain's version (its ``__version__`` attribute lags behind its releases)."""
    return metadata.version("torchstain")


def _normaliser(method: str) -> Any:
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

    if method == "macenko":
        return NumpyMacenkoNormalizer()
    if method == "reinhard":
        return NumpyReinhardNormalizer()
    raise ValueError(f"unknown stain normalisation {method!r}; one of {METHODS}")


def _not_black(pixels: np.ndarray, black_value: int) -> np.ndarray:
    """The rows of ``pixels`` [N, 3] that are not the near-black fill (``max(R, G, B) >= black_value``)."""
    return pixels.max(axis=1) >= black_value


def _stained(pixels: np.ndarray, method: str, black_value: int) -> np.ndarray:
    """The rows of ``pixels`` [N, 3] a method fits on: not near-black; for Macenko also not background (optical
    density ``-log((I + 1) / IO)`` >= ``BETA`` in every channel: torchstain's own rule)."""
    keep = _not_black(pixels, black_value)
    if method == "macenko":
        keep &= ((pixels.astype(np.float64) + 1) / IO <= np.exp(-BETA)).all(axis=1)
    return keep


@dataclass(frozen=True)
class StainReference:
    """A fitted stain reference: ``parameters`` are the method's fitted values (Macenko: ``stain_matrix``
    [3, 2] haematoxylin and eosin OD vectors as columns, ``max_concentrations`` [2]; Reinhard: ``lab_means``
    and ``lab_stds`` [3], in torchstain's LAB scale) plus the pixel rules (``black_value``, and Macenko's
    ``io``, ``alpha``, ``beta``); ``tiles`` names the tiles fitted on; ``sample`` how they were drawn."""

    method: str
    parameters: dict
    tiles: list[str]
    torchstain_version: str
    sample: dict = field(default_factory=dict)

    def content(self) -> dict:
        """Everything the record holds but its digest."""
        return {"format": FORMAT, "method": self.method, "parameters": self.parameters, "tiles": list(self.tiles),
                "torchstain_version": self.torchstain_version, "sample": self.sample}

    @property
    def sha256(self) -> str:
        """sha256 of the canonical JSON of :meth:`content` (sorted keys, no spaces)."""
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write the record, its sha256 included, atomically."""
        return atomic_write_text(Path(path), json.dumps({**self.content(), "sha256": self.sha256}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StainReference:
        """Read a record written by :meth:`save`; ``FileNotFoundError`` when missing, ``ValueError`` when it is
        not one or its content does not match its sha256 (edited or damaged)."""
        data = json.loads(Path(path).read_text())
        try:
            reference = cls(str(data["method"]), dict(data["parameters"]), [str(t) for t in data["tiles"]],
                            str(data["torchstain_version"]), dict(data.get("sample", {})))
            recorded = str(data["sha256"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a stain reference ({err!r} missing or malformed)") from None
        if data.get("format") != FORMAT or reference.method not in METHODS:
            raise ValueError(f"{path} is not a stain reference of format {FORMAT} with a method of {METHODS}")
        if recorded != reference.sha256:
            raise ValueError(f"{path}: its content does not match its sha256 (edited or damaged): fit it again")
        return reference

    @classmethod
    def fit(cls, method: str, tiles: Sequence[np.ndarray], names: Sequence[str], black_value: int = 25,
            sample: dict | None = None) -> StainReference:
        """Fit ``method`` on a mosaic of uint8 RGB ``tiles`` (their stain pixels, subsampled with a fixed seed
        beyond ``MAX_FIT_PIXELS``); ``names`` identify the tiles in the record. A ``StainError`` when the
        tiles hold too little stain."""
        pixels = np.concatenate([np.asarray(t, np.uint8).reshape(-1, 3) for t in tiles]) if len(tiles) else \
            np.zeros((0, 3), np.uint8)
        pixels = pixels[_stained(pixels, method, black_value)]
        if len(pixels) < MIN_FIT_PIXELS:
            raise StainError(f"the {len(tiles)} reference tiles hold {len(pixels)} stained pixels: too few to fit "
                             f"{method} (background or blank tiles?)")
        if len(pixels) > MAX_FIT_PIXELS:
            pixels = pixels[np.sort(np.random.default_rng(0).choice(len(pixels), MAX_FIT_PIXELS, replace=False))]
        normaliser = _normaliser(method)
        mosaic = pixels.reshape(-1, 1, 3)
        with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
            if method == "macenko":
                normaliser.fit(mosaic, Io=IO, alpha=ALPHA, beta=BETA)
                parameters = {"stain_matrix": np.asarray(normaliser.HERef).tolist(),
                              "max_concentrations": np.asarray(normaliser.maxCRef).tolist(),
                              "io": IO, "alpha": ALPHA, "beta": BETA}
            else:
                normaliser.fit(mosaic)
                parameters = {"lab_means": np.asarray(normaliser.target_means, float).tolist(),
                              "lab_stds": np.asarray(normaliser.target_stds, float).tolist()}
        parameters["black_value"] = int(black_value)
        if not np.isfinite(np.concatenate([np.ravel(v) for v in parameters.values()])).all():
            raise StainError(f"{method} fitted non-finite parameters on the reference tiles")
        return cls(method, parameters, list(names), torchstain_version(), dict(sample or {}))


def reference_attrs(reference: StainReference | None) -> dict[str, str]:
    """The embeddings' attributes that name the reference their tiles were normalised to (stage 03 and stage 05
    write them, and reuse a cached h5 only when they match); none without normalisation."""
    return {} if reference is None else {"stain_reference": reference.sha256}


class StainNormaliser:
    """Maps uint8 tile batches [B, H, W, 3] onto a :class:`StainReference`, tile by tile (a new array; the
    input is not changed). A tile that cannot be fitted is returned as it was, counted in :attr:`unchanged`
    and logged at debug level. Safe to share between threads (torchstain's ``normalize`` keeps no state)."""

    def __init__(self, reference: StainReference):
        self.reference = reference
        self.method = reference.method
        params = reference.parameters
        self.black_value = int(params.get("black_value", 0))
        self._normaliser = _normaliser(self.method)
        if self.method == "macenko":
            self._normaliser.HERef = np.asarray(params["stain_matrix"], float)
            self._normaliser.maxCRef = np.asarray(params["max_concentrations"], float)
            self._options = {"Io": params.get("io", IO), "alpha": params.get("alpha", ALPHA),
                             "beta": params.get("beta", BETA), "stains": False}
        else:
            self._normaliser.target_means = np.asarray(params["lab_means"], np.float32)
            self._normaliser.target_stds = np.asarray(params["lab_stds"], np.float32)
        self.unchanged = 0
        self._lock = threading.Lock()

    def tile(self, rgb: np.ndarray) -> np.ndarray:
        """One tile [H, W, 3] normalised; a ``StainError`` when it cannot be (too little stain)."""
        pixels = rgb.reshape(-1, 3)
        stained = int(_stained(pixels, self.method, self.black_value).sum())
        if stained < max(1, MIN_STAIN_FRACTION * len(pixels)):
            raise StainError(f"{stained} of {len(pixels)} pixels are stained")
        keep = _not_black(pixels, self.black_value)  # every pixel but the black fill is mapped
        try:
            with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
                if self.method == "macenko":
                    mapped = self._normaliser.normalize(pixels[keep].reshape(-1, 1, 3), **self._options)[0]
                else:
                    mapped = self._normaliser.normalize(pixels[keep].reshape(-1, 1, 3))
        except (FloatingPointError, np.linalg.LinAlgError, ValueError, IndexError) as err:
            raise StainError(f"{type(err).__name__}: {err}") from None
        out = pixels.copy()
        out[keep] = mapped.reshape(-1, 3)
        return out.reshape(rgb.shape)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        out = np.empty_like(batch)
        for i, rgb in enumerate(batch):
            try:
                out[i] = self.tile(rgb)
            except StainError as err:
                out[i] = rgb
                with self._lock:
                    self.unchanged += 1
                log.debug("stain normalisation (%s) left a tile unchanged: %s", self.method, err)
        return out
