"""Cut one slide into tiles at the target magnification: the code shared by stage 01 and fused inference."""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from ubc_ocean.config import ConfigError
from ubc_ocean.parallel import threaded_map
from ubc_ocean.slides import SlideError, SlideReader, is_tma_by_size, native_magnification, open_slide
from ubc_ocean.slides.reader import InMemorySlide, resize_area
from ubc_ocean.sources import SlideSpec
from ubc_ocean.tiling.grid import TilePlan, grid_origin, plan_tiles, slide_seed
from ubc_ocean.tiling.quality import FOCUS_METRICS, artefact_fraction, focus_score
from ubc_ocean.tiling.tissue import TissueMasks, background_mask, detect_tissue

log = logging.getLogger(__name__)


@dataclass
class PreparedSlide:
    """An opened slide with its tissue masks and tile plan, ready to be read."""

    spec: SlideSpec
    reader: SlideReader
    is_tma: bool
    native_magnification: float
    target_magnification: float
    tile_size: int
    extent: int
    low_res: np.ndarray | None  # None until the streaming pass has built it (PNG without thumbnail)
    masks: TissueMasks | None
    plan: TilePlan | None
    quality: dict
    planning: dict
    info: dict = field(default_factory=dict)
    view_size: tuple[int, int] | None = None  # level-0 (width, height) the low-res view covers; None: all
    view_origin: tuple[int, int] = (0, 0)  # level-0 (x, y) where that view starts

    @property
    def streaming(self) -> bool:
        """True when the tissue mask is built during the one decoding pass (no low-resolution view)."""
        return self.plan is None

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


_TILING_CHOICES = {
    "format": ("jpg", "jpeg", "png"),
    "sampling": ("random", "stratified"),
    "blur_metric": tuple(sorted(FOCUS_METRICS)),
}


def check_tiling_config(tiling: Mapping) -> None:
    """Refuse, before any slide is opened, a ``tiling`` section whose choices would fail every slide."""
    for key, choices in _TILING_CHOICES.items():
        if str(tiling[key]).lower() not in choices:
            raise ConfigError(f"tiling.{key} must be one of {', '.join(choices)}, got {tiling[key]!r}")
    threshold = str(tiling["saturation_threshold"]).lower()
    if threshold != "otsu":
        try:
            float(threshold)
        except ValueError:
            raise ConfigError(f"tiling.saturation_threshold must be 'otsu' or a number, "
                              f"got {tiling['saturation_threshold']!r}") from None


def prepare_slide(spec: SlideSpec, cfg: Mapping) -> PreparedSlide:
    """Open a slide, harmonise its scale, find tissue and plan the tiles (no tile pixels read yet)."""
    tiling, slides_cfg = cfg["tiling"], cfg["slides"]
    in_memory = round(float(slides_cfg["in_memory_max_megapixels"]) * 1e6)
    reader = open_slide(spec.path, thumbnail=spec.thumbnail, in_memory_max_pixels=in_memory)
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
        if reader.width < extent or reader.height < extent:
            raise SlideError(f"image {reader.width}x{reader.height} is smaller than one tile ({extent} px at "
                             f"{native:g}x for {tile_size} px at {target:g}x)")
        planning = {
            "min_fraction": float(tiling["min_tissue_fraction"]),
            "max_tiles": int(tiling["max_tiles_per_slide"]),
            "sampling": str(tiling["sampling"]),
            "seed": slide_seed(spec.slide_id, int(cfg["seed"])),
            "mask_max_side": int(tiling["mask_max_side"]),
            "tissue_cfg": dict(tiling),
        }
        low_res = masks = plan = None
        if reader.has_low_resolution_view:
            low_res = reader.low_resolution(planning["mask_max_side"])
            masks = detect_tissue(low_res, tiling)
            plan = _plan(masks, reader.width, reader.height, extent, planning)
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
        "reader": type(reader).__name__,
        "mask_source": _mask_source(reader, plan),
    }
    if plan is not None:
        info.update(planned_tiles=len(plan), fallback=plan.fallback)
    quality = {
        "blur_metric": str(tiling["blur_metric"]),
        "min_blur_score": float(tiling["min_blur_score"]),
        "max_artefact_fraction": float(tiling["max_artefact_fraction"]),
        "black_value": int(tiling["black_value"]),
        "dark_value": int(tiling["dark_value"]),
        "white_value": int(tiling["white_value"]),
        "fallback_tiles": int(tiling["quality_fallback_tiles"]),
    }
    return PreparedSlide(spec, reader, bool(is_tma), native, target, tile_size, extent, low_res, masks, plan,
                         quality, planning, info)


def _mask_source(reader: SlideReader, plan: TilePlan | None) -> str:
    if plan is None:
        return "built in the decoding pass"
    return "the whole image, held in memory" if isinstance(reader, InMemorySlide) else "low-resolution view"


def _plan(masks: TissueMasks, width: int, height: int, extent: int, planning: Mapping,
          offset: tuple[int, int] = (0, 0)) -> TilePlan:
    return plan_tiles(masks.tissue, masks.foreground, width, height, extent, planning["min_fraction"],
                      planning["max_tiles"], planning["sampling"], planning["seed"], offset=offset)


@dataclass
class _Verdict:
    """What the quality filters say of one tile."""

    foreground_ok: bool
    blur: float
    blurry: bool = False
    artefact: bool = False


def _judge(prepared: PreparedSlide, rgb: np.ndarray) -> _Verdict:
    """Foreground, focus and artefact checks of one tile (OpenCV work: runs on helper threads)."""
    quality = prepared.quality
    background = background_mask(rgb[::4, ::4], quality["black_value"], quality["white_value"])
    # At least half the minimum tissue fraction of the tile's own pixels must not be black or white fill.
    if 1.0 - background.mean() < 0.5 * prepared.planning["min_fraction"]:
        return _Verdict(foreground_ok=False, blur=0.0)
    score = focus_score(rgb, quality["blur_metric"])
    if score < quality["min_blur_score"]:
        return _Verdict(True, score, blurry=True)
    artefact = artefact_fraction(rgb, quality["black_value"], quality["dark_value"]) > quality["max_artefact_fraction"]
    return _Verdict(True, score, artefact=artefact)


def _judged(prepared: PreparedSlide, boxes: list[tuple[int, int]]) -> Iterator[tuple[int, int, np.ndarray, _Verdict]]:
    """Read ``boxes`` in one pass while helper threads judge the tiles already read."""
    tiles = prepared.reader.read_boxes(boxes, prepared.extent, prepared.tile_size)
    for ((x, y), rgb), verdict in threaded_map(lambda tile: _judge(prepared, tile[1]), tiles):
        yield x, y, rgb, verdict


def _record(prepared: PreparedSlide, x: int, y: int, fraction: float, score: float) -> TileRecord:
    return TileRecord(x=int(x), y=int(y), extent=prepared.extent, magnification=prepared.target_magnification,
                      tissue_fraction=round(float(fraction), 4), blur_score=round(score, 2))


def _kept(prepared: PreparedSlide, verdict: _Verdict) -> bool:
    """Count a quality rejection in ``prepared.info``; True when the tile is kept."""
    if verdict.blurry:
        prepared.info["rejected_blur"] += 1
    elif verdict.artefact:
        prepared.info["rejected_artefact"] += 1
    return not (verdict.blurry or verdict.artefact)


class _Reserve:
    """The ``size`` sharpest tiles the quality filters rejected, in bounded memory: the slide's tiles
    should every tissue tile fail the filters (a wholly defocused or ink-covered slide)."""

    def __init__(self, size: int):
        self.size = size
        self._heap: list[tuple[float, int, tuple[int, int], np.ndarray]] = []
        self._order = itertools.count()

    def offer(self, score: float, box: tuple[int, int], rgb: np.ndarray) -> None:
        if self.size <= 0:
            return
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, (score, next(self._order), box, rgb.copy()))  # readers may reuse buffers
        elif score > self._heap[0][0]:
            heapq.heapreplace(self._heap, (score, next(self._order), box, rgb.copy()))

    def tiles(self, eligible: Container[tuple[int, int]]) -> list[tuple[tuple[int, int], float, np.ndarray]]:
        """The reserved tiles whose box is ``eligible``, in row-major order."""
        kept = [(box, score, rgb) for score, _, box, rgb in self._heap if box in eligible]
        return sorted(kept, key=lambda item: (item[0][1], item[0][0]))


def _quality_fallback(
    prepared: PreparedSlide, reserve: _Reserve, eligible: TilePlan
) -> Iterator[tuple[TileRecord, np.ndarray]]:
    """Yield the reserve's tiles that lie in ``eligible``; they become the slide's plan, and
    ``prepared.info['fallback']`` says why."""
    fraction_by_box = dict(zip(eligible.boxes, eligible.tissue_fraction.tolist(), strict=True))
    tiles = reserve.tiles(fraction_by_box)
    if not tiles:
        return
    info = prepared.info
    why = f"{_quality_rejections(info)}: kept the {len(tiles)} sharpest"
    info["fallback"] = "; ".join(filter(None, [info.get("fallback", ""), why]))
    info["quality_fallback_tiles"] = len(tiles)
    boxes = [box for box, _, _ in tiles]
    prepared.plan = TilePlan(
        xs=np.array([x for x, _ in boxes], np.int64), ys=np.array([y for _, y in boxes], np.int64),
        tissue_fraction=np.array([fraction_by_box[box] for box in boxes], np.float32),
        extent=eligible.extent, fallback=info["fallback"],
    )
    for (x, y), score, rgb in tiles:
        yield _record(prepared, x, y, fraction_by_box[(x, y)], score), rgb


def _quality_rejections(info: Mapping) -> str:
    return (f"every tissue tile failed the quality filters ({info.get('rejected_blur', 0)} blurry, "
            f"{info.get('rejected_artefact', 0)} artefact)")


def no_tiles_message(info: Mapping) -> str:
    """Why a slide yielded no tile: background only, or tissue that the quality filters all rejected."""
    if info.get("rejected_blur", 0) + info.get("rejected_artefact", 0):
        return (f"{_quality_rejections(info)}; tiling.min_blur_score, tiling.max_artefact_fraction and "
                "tiling.quality_fallback_tiles set them")
    return "no tissue found: every tile is background (blank or all-black image?)"


def iter_tiles(prepared: PreparedSlide) -> Iterator[tuple[TileRecord, np.ndarray]]:
    """Read the slide in one row-major pass, yielding the tiles that pass the quality filters.

    With a low-resolution view (thumbnail, pyramid) only the planned tiles are read. Without one (a PNG
    with no thumbnail) every grid cell streams past once: its shrink builds the tissue mask while
    cells with enough non-background pixels are yielded as candidates; call :func:`finalise` afterwards
    to learn which candidates the plan keeps. Rejections are counted in ``prepared.info``. Should the
    quality filters reject every tissue tile, the sharpest ``tiling.quality_fallback_tiles`` of them are
    yielded at the end instead, and ``info['fallback']`` says so.
    """
    prepared.info.update(rejected_blur=0, rejected_artefact=0, rejected_background=0)
    limit, cap = prepared.quality["fallback_tiles"], prepared.planning["max_tiles"]
    reserve = _Reserve(min(limit, cap) if cap > 0 else limit)
    if not prepared.streaming:
        plan = prepared.plan
        fraction_by_box = dict(zip(plan.boxes, plan.tissue_fraction.tolist(), strict=True))
        passed = 0
        for x, y, rgb, verdict in _judged(prepared, plan.boxes):
            if not verdict.foreground_ok:  # the low-resolution mask overstated this tile's tissue
                prepared.info["rejected_background"] += 1
            elif _kept(prepared, verdict):
                passed += 1
                yield _record(prepared, x, y, fraction_by_box[(x, y)], verdict.blur), rgb
            else:
                reserve.offer(verdict.blur, (x, y), rgb)
        if not passed:
            yield from _quality_fallback(prepared, reserve, plan)
        return
    yield from _stream_all_cells(prepared, reserve)


def _stream_all_cells(prepared: PreparedSlide, reserve: _Reserve) -> Iterator[tuple[TileRecord, np.ndarray]]:
    reader, extent, planning = prepared.reader, prepared.extent, prepared.planning
    # The view covers the complete cells of the centred grid only: the margins outside it are never read.
    width, height = (reader.width // extent) * extent, (reader.height // extent) * extent
    ox, oy = grid_origin(reader.width, reader.height, extent)
    factor = max(1.0, max(width, height) / planning["mask_max_side"])
    canvas = np.zeros((max(1, int(np.ceil(height / factor))), max(1, int(np.ceil(width / factor))), 3), np.uint8)
    grid = [(ox + x, oy + y) for y in range(0, height, extent) for x in range(0, width, extent)]
    candidates = []
    for x, y, rgb, verdict in _judged(prepared, grid):
        x0, y0 = round((x - ox) / factor), round((y - oy) / factor)
        x1 = min(canvas.shape[1], max(x0 + 1, round((x - ox + extent) / factor)))
        y1 = min(canvas.shape[0], max(y0 + 1, round((y - oy + extent) / factor)))
        canvas[y0:y1, x0:x1] = resize_area(rgb, x1 - x0, y1 - y0)
        if not verdict.foreground_ok:
            continue
        if _kept(prepared, verdict):
            candidates.append((x, y))
            yield _record(prepared, x, y, float("nan"), verdict.blur), rgb
        else:
            reserve.offer(verdict.blur, (x, y), rgb)
    prepared.low_res, prepared.view_size, prepared.view_origin = canvas, (width, height), (ox, oy)
    prepared.masks = detect_tissue(canvas, planning["tissue_cfg"])
    prepared.plan = _plan(prepared.masks, width, height, extent, planning, offset=(ox, oy))
    prepared.info.update(planned_tiles=len(prepared.plan), fallback=prepared.plan.fallback)
    planned = set(prepared.plan.boxes)
    if not any(box in planned for box in candidates):  # the plan keeps none of the tiles that passed
        uncapped = _plan(prepared.masks, width, height, extent, {**planning, "max_tiles": 0}, offset=(ox, oy))
        yield from _quality_fallback(prepared, reserve, uncapped)


def finalise(prepared: PreparedSlide, records: list[TileRecord]) -> list[bool]:
    """Which of the yielded ``records`` the plan keeps (all, unless the mask was built while streaming).

    Kept records get their tissue fraction from the plan.
    """
    fraction_by_box = dict(zip(prepared.plan.boxes, prepared.plan.tissue_fraction.tolist(), strict=True))
    keep = []
    for record in records:
        fraction = fraction_by_box.get((record.x, record.y))
        keep.append(fraction is not None)
        if fraction is not None:
            record.tissue_fraction = round(float(fraction), 4)
    prepared.info["streamed_not_kept"] = keep.count(False)
    return keep
