"""Cut one slide into tiles at the target magnification: the code shared by stage 01 and fused inference."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ubc_ocean.slides import SlideError, SlideReader, is_tma_by_size, native_magnification, open_slide
from ubc_ocean.tiling.grid import TilePlan, plan_tiles, slide_seed
from ubc_ocean.tiling.quality import artefact_fraction, blur_score
from ubc_ocean.tiling.tissue import TissueMasks, detect_tissue

log = logging.getLogger(__name__)


@dataclass
class SlideSpec:
    """What the tiler needs to know about one slide before opening it."""

    source: str
    image_id: str
    path: Path
    thumbnail: Path | None = None
    is_tma: bool | None = None
    magnification: float | None = None  # per-source setting, used when the file has no mpp
    expected_size: tuple[int, int] | None = None  # (width, height) from the CSV, checked against the file
    label: str | None = None
    competition_scale: bool = False  # no mpp: WSI 20x / TMA 40x (slides.*), as for the competition's PNGs

    @property
    def slide_id(self) -> str:
        return f"{self.source}/{self.image_id}"


@dataclass
class PreparedSlide:
    """An opened slide with its tissue masks and tile plan, ready to be read."""

    spec: SlideSpec
    reader: SlideReader
    is_tma: bool
    native_magnification: float
    target_magnification: float
    tile_size: int
    low_res: np.ndarray
    masks: TissueMasks
    plan: TilePlan
    quality: dict
    info: dict = field(default_factory=dict)

    def close(self) -> None:
        self.reader.close()


@dataclass
class TileRecord:
    """One kept tile: level-0 box, the magnification it was cut at, and its scores."""

    x: int
    y: int
    extent: int
    magnification: float
    tissue_fraction: float
    blur_score: float


def _check_size(spec: SlideSpec, reader: SlideReader) -> None:
    if spec.expected_size is None:
        return
    expected = tuple(int(v) for v in spec.expected_size)
    if expected != (reader.width, reader.height):
        raise SlideError(
            f"size mismatch: CSV says {expected[0]}x{expected[1]}, file is {reader.width}x{reader.height}"
        )


def prepare_slide(spec: SlideSpec, cfg: Mapping) -> PreparedSlide:
    """Open a slide, harmonise its scale, find tissue and plan the tiles (no tile pixels read yet)."""
    tiling, slides_cfg = cfg["tiling"], cfg["slides"]
    reader = open_slide(spec.path, thumbnail=spec.thumbnail)
    try:
        _check_size(spec, reader)
        is_tma = spec.is_tma
        if is_tma is None:
            is_tma = is_tma_by_size(
                reader.width, reader.height, slides_cfg["tma_max_side"], slides_cfg["tma_square_tolerance"]
            )
        try:
            native = native_magnification(
                is_tma=is_tma,
                mpp=reader.mpp,
                objective_power=reader.objective_power,
                source_magnification=spec.magnification,
                slides_cfg=slides_cfg if spec.competition_scale else None,
            )
        except ValueError as err:
            raise SlideError(str(err)) from err
        target = float(tiling["target_magnification"])
        tile_size = int(tiling["tile_size"])
        extent = max(1, round(tile_size * native / target))
        low_res = reader.low_resolution(int(tiling["mask_max_side"]))
        masks = detect_tissue(low_res, tiling)
        plan = plan_tiles(
            masks.tissue,
            masks.foreground,
            reader.width,
            reader.height,
            extent,
            float(tiling["min_tissue_fraction"]),
            int(tiling["max_tiles_per_slide"]),
            str(tiling["sampling"]),
            slide_seed(spec.slide_id, int(cfg["seed"])),
        )
    except Exception:
        reader.close()
        raise
    info = {
        "width": reader.width,
        "height": reader.height,
        "mpp": reader.mpp,
        "is_tma": bool(is_tma),
        "native_magnification": native,
        "target_magnification": target,
        "extent": extent,
        "planned_tiles": len(plan),
        "fallback": plan.fallback,
    }
    quality = {
        "min_blur_score": float(tiling["min_blur_score"]),
        "max_artefact_fraction": float(tiling["max_artefact_fraction"]),
        "black_value": int(tiling["black_value"]),
        "dark_value": int(tiling["dark_value"]),
    }
    return PreparedSlide(spec, reader, bool(is_tma), native, target, tile_size, low_res, masks, plan, quality, info)


def iter_tiles(prepared: PreparedSlide) -> Iterator[tuple[TileRecord, np.ndarray]]:
    """Read the planned tiles in one row-major pass, yielding those that pass the quality filters.

    Rejections are counted in ``prepared.info`` (``rejected_blur``, ``rejected_artefact``).
    """
    plan, quality = prepared.plan, prepared.quality
    fraction_by_box = dict(zip(plan.boxes, plan.tissue_fraction.tolist(), strict=True))
    prepared.info.update(rejected_blur=0, rejected_artefact=0)
    for (x, y), rgb in prepared.reader.read_boxes(plan.boxes, plan.extent, prepared.tile_size):
        score = blur_score(rgb)
        if score < quality["min_blur_score"]:
            prepared.info["rejected_blur"] += 1
            continue
        if artefact_fraction(rgb, quality["black_value"], quality["dark_value"]) > quality["max_artefact_fraction"]:
            prepared.info["rejected_artefact"] += 1
            continue
        record = TileRecord(
            x=int(x),
            y=int(y),
            extent=plan.extent,
            magnification=prepared.target_magnification,
            tissue_fraction=round(float(fraction_by_box[(x, y)]), 4),
            blur_score=round(score, 2),
        )
        yield record, rgb
