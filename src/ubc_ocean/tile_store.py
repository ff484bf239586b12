"""The tile store's format: one folder per slide, written atomically, keyed by the tiling parameters.

    {layout.tiles_root}/{source}/{image_id}/
        {x}_{y}.jpg ...    tiles at the target magnification
        index.csv          file, x, y, extent, magnification, tissue_fraction, blur_score (level-0 coords),
                           tumour_fraction (share of the tile that its supplemental mask marks tumour; NaN: no mask)
        slide.json         slide facts (size, magnification, TMA or WSI, label, fallback note, supplemental_mask if any;
                           a WSI's synthetic TMA cores, each a sibling folder {image_id}_core{k}, under synthetic_cores)
        qc.png             thumbnail + tissue mask + kept tiles
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.io_utils import atomic_write_csv, atomic_write_text
from ubc_ocean.memory import limit_malloc_arenas

INDEX_COLUMNS = ["file", "x", "y", "extent", "magnification", "tissue_fraction", "blur_score", "tumour_fraction"]
TUMOUR_FRACTION = "tumour_fraction"
MASK_FACT = "supplemental_mask"  # slide.json: {"file", "size"} of the mask the fractions come from (absent: none)
INDEX_FILE = "index.csv"
SLIDE_FILE = "slide.json"
CORES_KEY = "synthetic_cores"  # slide.json: the synthetic TMA cores cut from the slide (tiling/cores.py)
QC_FILE = "qc.png"


def tiling_key(cfg: Mapping) -> str:
    """A short, readable folder name that changes whenever a setting that shapes the tiles changes
    (:attr:`TilingSettings.key <ubc_ocean.config.tiling.TilingSettings.key>`)."""
    return TilingSettings.from_config(cfg).key


def is_complete(folder: Path) -> bool:
    """A slide folder exists only once complete (it is renamed into place), but check its index too."""
    return (folder / INDEX_FILE).is_file() and (folder / SLIDE_FILE).is_file()


def _magnification_setting(value: float | None) -> float | None:
    return None if value is None else float(value)


def is_current(folder: Path, source_magnification: float | None) -> bool:
    """Complete (its synthetic cores' folders too), and cut with the source magnification configured now (a
    per-source setting, outside the tiling key): a slide whose source setting changed is tiled again rather
    than skipped."""
    if not is_complete(folder):
        return False
    info = read_slide_info(folder)
    if any(not is_complete(folder.parent / core["image_id"]) for core in info.get(CORES_KEY, [])):
        return False  # a synthetic core's folder is gone: the slide's output is not whole
    return info.get("source_magnification") == _magnification_setting(source_magnification)


def fingerprint(folder: Path) -> str:
    """A short hash of a complete slide folder's index and facts; embeddings record it, so a slide tiled
    again is embedded again."""
    digest = hashlib.sha256()
    for name in (INDEX_FILE, SLIDE_FILE):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


def tile_file_name(x: int, y: int, fmt: str) -> str:
    return f"{x}_{y}.{fmt}"


def _encode_params(fmt: str, jpeg_quality: int) -> list[int]:
    return [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if fmt in ("jpg", "jpeg") else []


def write_tile(path: Path, rgb: np.ndarray, fmt: str, jpeg_quality: int) -> None:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), bgr, _encode_params(fmt, jpeg_quality)):
        raise OSError(f"could not write tile {path}")


def round_trip(rgb: np.ndarray, fmt: str, jpeg_quality: int) -> np.ndarray:
    """``rgb`` as :func:`read_tile` would give it back after :func:`write_tile`: the same JPEG encode and
    decode (bit for bit: the same OpenCV codec and settings), unchanged for a lossless format. Fused
    inference applies it so that test tiles look exactly like the training tiles stage 03 embedded."""
    if fmt not in ("jpg", "jpeg"):
        return rgb
    ok, payload = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), _encode_params(fmt, jpeg_quality))
    if not ok:
        raise OSError("could not JPEG-encode a tile")
    return cv2.cvtColor(cv2.imdecode(payload, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def read_tile(path: str | Path) -> np.ndarray:
    """Decode one tile file to RGB uint8; raises ``OSError`` for an unreadable file."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot decode tile {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def sample_tiles(folders: Mapping[str, Path], count: int, seed: int) -> list[tuple[str, Path]]:
    """``count`` tiles ``(slide_id/file, path)`` of the slides' complete tile ``folders`` (``slide_id ->
    folder``; incomplete ones left out), drawn with ``seed`` and spread over the slides: each slide's tiles
    in a seeded order, the slides in a seeded order, one tile of each slide per round (a slide with many
    tiles does not outweigh the others; a small slide's share goes to the rest)."""
    rng = np.random.default_rng(seed)
    orders = []
    for slide_id, folder in sorted(folders.items()):
        if not is_complete(folder):
            continue
        files = read_index(folder)["file"].tolist()
        orders.append([(f"{slide_id}/{files[i]}", folder / files[i]) for i in rng.permutation(len(files))])
    orders = [orders[i] for i in rng.permutation(len(orders))]
    chosen: list[tuple[str, Path]] = []
    for depth in range(max((len(order) for order in orders), default=0)):
        chosen += [order[depth] for order in orders if depth < len(order)][:count - len(chosen)]
        if len(chosen) >= count:
            break
    return chosen


def write_index(folder: Path, rows: list[dict]) -> None:
    """``index.csv`` of ``rows`` (a row without ``tumour_fraction`` gets NaN: no mask)."""
    frame = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    frame[TUMOUR_FRACTION] = frame[TUMOUR_FRACTION].astype(float)
    frame.to_csv(folder / INDEX_FILE, index=False)


def read_index(folder: Path) -> pd.DataFrame:
    """A slide's tile index; one written before tumour fractions were recorded gets a NaN column (no mask)."""
    frame = pd.read_csv(folder / INDEX_FILE)
    if TUMOUR_FRACTION not in frame:
        frame[TUMOUR_FRACTION] = np.nan
    return frame


def replace_tumour_fractions(folder: Path, values: list[float], facts: dict | None) -> None:
    """Give a complete folder's tiles new tumour fractions (``values`` in index order) and record the
    mask they come from: ``index.csv`` then ``slide.json``, each replaced atomically."""
    index = read_index(folder)
    index[TUMOUR_FRACTION] = np.asarray(values, dtype=float)
    atomic_write_csv(index[INDEX_COLUMNS], folder / INDEX_FILE)
    info = {key: value for key, value in read_slide_info(folder).items() if key != MASK_FACT}
    info = {**info, **mask_fact(facts)}
    atomic_write_text(folder / SLIDE_FILE, json.dumps(info, indent=2, default=str))


def mask_fact(facts: dict | None) -> dict:
    """What ``slide.json`` says of the slide's mask: ``{supplemental_mask: facts}``, nothing without one."""
    return {MASK_FACT: facts} if facts else {}


def recorded_mask(folder: Path) -> dict | None:
    """The supplemental mask a complete slide folder's tumour fractions come from (None: none, or a folder
    tiled before masks were read)."""
    return read_slide_info(folder).get(MASK_FACT)


def write_slide_info(folder: Path, info: Mapping, source_magnification: float | None) -> None:
    """``slide.json``: the slide's facts and the source magnification setting it was cut with."""
    facts = {**info, "source_magnification": _magnification_setting(source_magnification)}
    (folder / SLIDE_FILE).write_text(json.dumps(facts, indent=2, default=str))


def read_slide_info(folder: Path) -> dict:
    return json.loads((folder / SLIDE_FILE).read_text())


class TileWriter:
    """Encodes and writes tiles on background threads (OpenCV releases the GIL) while the caller decodes.

    At most ``max_pending`` tiles wait in memory; leaving the ``with`` block waits for every write and
    re-raises the first error.
    """

    def __init__(self, fmt: str, jpeg_quality: int, threads: int = 2, max_pending: int = 64):
        limit_malloc_arenas()
        self.fmt, self.jpeg_quality = fmt, jpeg_quality
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tile-writer")
        self._pending: deque[Future] = deque()
        self._max_pending = max_pending

    def submit(self, path: Path, rgb: np.ndarray) -> None:
        if len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write_tile, path, rgb, self.fmt, self.jpeg_quality))

    def __enter__(self) -> TileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
