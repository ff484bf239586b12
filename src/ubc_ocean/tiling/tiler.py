"""Cut one slide into tiles at the target magnification: the code shared by stage 01, fused inference and
focus calibration.

One :class:`SlideTiler` is one slide's tiling session::

    with SlideTiler(spec, settings) as tiler:  # opens the slide; plans now when it has a low-res view
        records = []
        for record, rgb in tiler:              # the one row-major pass (candidates, when streaming)
            records.append(record)
        kept = tiler.finish(records)           # the records the plan keeps, with their tissue fractions
        overlay = tiler.qc_overlay(kept)       # the QC picture
        info = tiler.info                      # SlideTilingInfo: what slide.json records

Steps out of order (a second pass, ``finish`` before the pass is drained, ``info`` before ``finish``)
raise :class:`TilerUsageError`. Other grid cells (a synthetic TMA core's, say) can be read in the same pass
(:meth:`SlideTiler.read_also`, when the plan comes before the pass) or afterwards (:meth:`SlideTiler.read_cells`).
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import itertools
import logging
from collections.abc import Callable, Container, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.parallel import threaded_map
from ubc_ocean.slides import SlideError, SlideReader, is_tma_by_size, native_magnification, open_slide
from ubc_ocean.slides.reader import InMemorySlide, resize_area, sorted_boxes
from ubc_ocean.sources import SlideSpec
from ubc_ocean.tiling.grid import TilePlan, cell_fractions, grid_origin, plan_tiles, slide_seed
from ubc_ocean.tiling.qc import draw_overlay
from ubc_ocean.tiling.quality import artefact_fraction, focus_score
from ubc_ocean.tiling.tissue import INTENSITY, SATURATION, TissueMasks, background_mask, detect_tissue

log = logging.getLogger(__name__)

MASK_FROM_VIEW = "low-resolution view"
MASK_IN_MEMORY = "the whole image, held in memory"
MASK_STREAMED = "built in the decoding pass"


class TilerUsageError(RuntimeError):
    """A :class:`SlideTiler` used out of order: a bug in the caller, not a bad slide."""


@dataclass(frozen=True)
class TileRecord:
    """One tile: level-0 box, the magnification it was cut at, and its scores (a streamed candidate's
    tissue fraction is NaN until :meth:`SlideTiler.finish` gives it the plan's)."""

    x: int
    y: int
    extent: int
    magnification: float
    tissue_fraction: float
    blur_score: float

    @property
    def box(self) -> tuple[int, int]:
        return self.x, self.y


@dataclass(frozen=True)
class SlideTilingInfo:
    """What one slide's tiling found: the facts ``slide.json`` records (:meth:`to_dict`)."""

    source: str
    image_id: str
    label: str | None
    path: str
    width: int
    height: int
    mpp: float | None
    is_tma: bool
    native_magnification: float
    target_magnification: float
    extent: int  # a tile's level-0 side
    reader: str  # the reader class
    mask_source: str  # MASK_FROM_VIEW, MASK_IN_MEMORY or MASK_STREAMED
    thumbnail_rejected: str  # why the slide's thumbnail was not used for the mask ('' when used, or none)
    tissue_signal: str  # SATURATION, or INTENSITY for a view without colour (a greyscale image)
    planned_tiles: int  # cells the tissue plan chose
    fallback: str  # why the tiles are not the plain tissue-threshold selection ('' when they are)
    rejected_blur: int
    rejected_artefact: int
    rejected_background: int  # planned tiles whose own pixels were background (not counted when streaming)
    quality_fallback_tiles: int  # rejected tiles kept because every tissue tile failed the filters (0: none)
    streamed_not_kept: int  # streamed candidates that the plan, known only after the pass, left out
    n_tiles: int  # tiles kept

    @property
    def streaming(self) -> bool:
        return self.mask_source == MASK_STREAMED

    def to_dict(self) -> dict:
        """The facts as ``slide.json`` holds them, in its key order (which follows the order the tiler
        learns them: streaming plans after the pass); the exceptions only when they happened:
        ``thumbnail_rejected`` when set, ``tissue_signal`` when not saturation, ``quality_fallback_tiles``
        when nonzero."""
        facts = ["width", "height", "mpp", "is_tma", "native_magnification", "target_magnification", "extent",
                 "reader", "mask_source"]
        facts += ["thumbnail_rejected"] if self.thumbnail_rejected else []
        facts += ["tissue_signal"] if self.tissue_signal != SATURATION else []
        plan, rejections = ("planned_tiles", "fallback"), ("rejected_blur", "rejected_artefact", "rejected_background")
        names = [*facts, *(rejections + plan if self.streaming else plan + rejections)]
        names += ["quality_fallback_tiles"] if self.quality_fallback_tiles else []
        names += ["streamed_not_kept", "source", "image_id", "label", "n_tiles", "path"]
        return {name: getattr(self, name) for name in names}

    def no_tiles_message(self) -> str:
        """Why a slide yielded no tile: background only, or tissue that the quality filters all rejected."""
        if self.rejected_blur + self.rejected_artefact:
            return (f"{_quality_rejections(self.rejected_blur, self.rejected_artefact)}; tiling.min_blur_score, "
                    "tiling.max_artefact_fraction and tiling.quality_fallback_tiles set them")
        return "no tissue found: every tile is background (blank or all-black image?)"


def _quality_rejections(blur: int, artefact: int) -> str:
    return f"every tissue tile failed the quality filters ({blur} blurry, {artefact} artefact)"


@dataclass(frozen=True)
class _MaskView:
    """The low-resolution picture the tissue mask was found on: ``size`` level-0 pixels from ``origin``."""

    low_res: np.ndarray
    masks: TissueMasks
    size: tuple[int, int]
    origin: tuple[int, int]


@dataclass(frozen=True)
class CellGrid:
    """Per-cell values of the slide's centred tile grid: ``values[r, c]`` is the cell whose level-0 box
    starts at ``(x0 + c * extent, y0 + r * extent)``."""

    values: np.ndarray
    x0: int
    y0: int
    extent: int

    def box(self, row: int, col: int) -> tuple[int, int]:
        """Level-0 top-left corner of cell ``(row, col)``."""
        return self.x0 + col * self.extent, self.y0 + row * self.extent


@dataclass
class _Verdict:
    """What the quality filters say of one tile."""

    foreground_ok: bool
    blur: float
    blurry: bool = False
    artefact: bool = False


def _judge(settings: TilingSettings, rgb: np.ndarray) -> _Verdict:
    """Foreground, focus and artefact checks of one tile (OpenCV work: runs on helper threads)."""
    background = background_mask(rgb[::4, ::4], settings.black_value, settings.white_value)
    # At least half the minimum tissue fraction of the tile's own pixels must not be black or white fill.
    if 1.0 - background.mean() < 0.5 * float(settings.min_tissue_fraction):
        return _Verdict(foreground_ok=False, blur=0.0)
    score = focus_score(rgb, settings.blur_metric)
    if score < float(settings.min_blur_score):
        return _Verdict(True, score, blurry=True)
    artefact = (artefact_fraction(rgb, settings.black_value, settings.dark_value)
                > float(settings.max_artefact_fraction))
    return _Verdict(True, score, artefact=artefact)


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


class _State(enum.Enum):
    """Where a tiler is in its session (the words end its error messages)."""

    READY = "not read yet"
    READING = "half read (its pass was left before the end)"
    READ = "read"
    FINISHED = "finished"


def _fractions(plan: TilePlan) -> dict[tuple[int, int], float]:
    return dict(zip(plan.boxes, plan.tissue_fraction.tolist(), strict=True))


class SlideTiler:
    """One slide's tiling: open, harmonise the scale, find tissue, plan, read in one pass, keep.

    Opening reads no tile pixels. With a low-resolution view (a thumbnail that decodes and has the image's
    aspect ratio, a pyramid, or an image small enough to hold in memory) the tissue mask and the plan are
    made now and the pass reads only the planned tiles. Without one (a large PNG with no usable thumbnail:
    ``info.thumbnail_rejected`` says why one was set aside) every grid cell streams past once: its shrink builds
    the mask while the cells with enough non-background pixels are yielded as candidates, and
    :meth:`finish` says which of them the plan, known only then, keeps. Should the quality filters reject
    every tissue tile, the pass ends with the sharpest ``quality_fallback_tiles`` of them instead, and
    ``info.fallback`` says so.
    """

    def __init__(self, spec: SlideSpec, settings: TilingSettings, row_limit: int | None = None,
                 reader: SlideReader | None = None):
        """``row_limit`` (level-0 rows, None: the whole slide) confines the tiles to that many rows from the
        top (from the first row with tissue when the mask comes before the pass), so a sequential decoder
        (PNG) stops there: the lower-cost mode of a time-budgeted inference. Once open, ``row_limit`` is
        the level-0 row the pass reads down to. ``reader`` (None: ``spec.path`` is opened) tiles pixels
        already at hand, such as an :class:`InMemorySlide` of a synthetic TMA core; the tiler closes it."""
        self.spec, self.settings = spec, settings
        self.row_limit = None if row_limit is None else max(1, int(row_limit))
        self.reader: SlideReader = reader if reader is not None else open_slide(
            spec.path, thumbnail=spec.thumbnail, in_memory_max_pixels=settings.slides.in_memory_max_pixels,
            thumbnail_aspect_tolerance=float(settings.slides.thumbnail_aspect_tolerance))
        self._state, self._closed = _State.READY, False
        self._pass: Generator[tuple[TileRecord, np.ndarray], None, None] | None = None
        self._view: _MaskView | None = None
        self._plan: TilePlan | None = None  # the tissue plan
        self._keep: dict[tuple[int, int], float] | None = None  # what finish keeps: box -> tissue fraction
        self._yielded: dict[tuple[int, int], TileRecord] = {}
        self._fallback = ""
        self._rejected = {"blur": 0, "artefact": 0, "background": 0}
        self._quality_fallback_tiles = 0
        self._info: SlideTilingInfo | None = None
        self._also: frozenset[tuple[int, int]] = frozenset()  # other cells read in the pass (read_also)
        self._also_sink: Callable[[tuple[int, int], np.ndarray], None] | None = None
        try:
            self._open()
        except Exception:
            self.reader.close()
            raise

    def _open(self) -> None:
        spec, reader, slides = self.spec, self.reader, self.settings.slides
        _check_size(spec, reader)
        is_tma = spec.is_tma
        if is_tma is None:
            is_tma = is_tma_by_size(reader.width, reader.height, slides.tma_max_side, slides.tma_square_tolerance)
        try:
            native = native_magnification(
                is_tma=is_tma, mpp=reader.mpp, objective_power=reader.objective_power,
                source_magnification=spec.magnification,
                slides_cfg=dataclasses.asdict(slides) if spec.competition_scale else None,
            )
        except ValueError as err:
            raise SlideError(str(err)) from err
        target, tile_size = float(self.settings.target_magnification), self.settings.tile_size
        extent = max(1, round(tile_size * native / target))
        if reader.width < extent or reader.height < extent:
            raise SlideError(f"image {reader.width}x{reader.height} is smaller than one tile ({extent} px at "
                             f"{native:g}x for {tile_size} px at {target:g}x)")
        self.is_tma, self.native_magnification, self.target_magnification = bool(is_tma), native, target
        self.extent = extent
        self.seed = slide_seed(spec.slide_id, self.settings.seed)
        if not reader.has_low_resolution_view:
            self.mask_source = MASK_STREAMED
        else:
            self.mask_source = MASK_IN_MEMORY if isinstance(reader, InMemorySlide) else MASK_FROM_VIEW
        if reader.thumbnail_rejected:  # never stretched onto the image: the mask comes from its own pixels
            log.warning("%s: thumbnail %s not used (%s); the tissue mask comes from the image itself (%s)",
                        spec.slide_id, spec.thumbnail.name if spec.thumbnail else "", reader.thumbnail_rejected,
                        self.mask_source)
        if self.streaming:
            return
        low_res = reader.low_resolution(self.settings.mask_max_side)
        self._set_view(_MaskView(low_res, detect_tissue(low_res, self.settings), (reader.width, reader.height),
                                 (0, 0)))

    @property
    def streaming(self) -> bool:
        """True when the tissue mask is built during the one decoding pass (no low-resolution view)."""
        return self.mask_source == MASK_STREAMED

    # --- the pass ---------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[TileRecord, np.ndarray]]:
        """The one row-major pass: ``(record, rgb)`` of each tile that passes the quality filters."""
        if self._closed:
            raise TilerUsageError(f"{self.spec.slide_id}: the tiler is closed; open a new SlideTiler to read it")
        if self._state is not _State.READY:
            raise TilerUsageError(f"{self.spec.slide_id}: a SlideTiler reads its slide once, in one pass; this "
                                  f"slide is {self._state.value}: open a new SlideTiler to read it again")
        self._state = _State.READING
        self._pass = self._read()
        return self._pass

    def _read(self) -> Generator[tuple[TileRecord, np.ndarray], None, None]:
        limit, cap = self.settings.quality_fallback_tiles, self.settings.max_tiles_per_slide
        reserve = _Reserve(min(limit, cap) if cap > 0 else limit)
        tiles = self._stream_all_cells(reserve) if self.streaming else self._read_planned(reserve)
        for record, rgb in tiles:
            self._yielded[record.box] = record
            yield record, rgb
        if self._keep is None:  # no quality fallback: the tissue plan decides
            self._keep = _fractions(self._plan)
        self._state = _State.READ

    def _judged(self, boxes: list[tuple[int, int]], unjudged: Container[tuple[int, int]] = frozenset()
                ) -> Iterator[tuple[int, int, np.ndarray, _Verdict | None]]:
        """Read ``boxes`` in one pass while helper threads judge the tiles already read (those in
        ``unjudged`` are read only: their verdict is None)."""
        settings = self.settings
        tiles = self.reader.read_boxes(boxes, self.extent, settings.tile_size)
        def judge(tile: tuple[tuple[int, int], np.ndarray]) -> _Verdict | None:
            return None if tile[0] in unjudged else _judge(settings, tile[1])
        for ((x, y), rgb), verdict in threaded_map(judge, tiles):
            yield x, y, rgb, verdict

    def _passes(self, verdict: _Verdict) -> bool:
        """Count a quality rejection; True when the tile is kept."""
        if verdict.blurry:
            self._rejected["blur"] += 1
        elif verdict.artefact:
            self._rejected["artefact"] += 1
        return not (verdict.blurry or verdict.artefact)

    def _record(self, x: int, y: int, fraction: float, score: float) -> TileRecord:
        return TileRecord(x=int(x), y=int(y), extent=self.extent, magnification=self.target_magnification,
                          tissue_fraction=round(float(fraction), 4), blur_score=round(score, 2))

    def _read_planned(self, reserve: _Reserve) -> Iterator[tuple[TileRecord, np.ndarray]]:
        plan = self._plan
        fraction_by_box = _fractions(plan)
        boxes, also_only = plan.boxes, frozenset()
        if self._also:  # the other cells asked for join the one pass, in row-major order
            also_only = self._also.difference(fraction_by_box)
            boxes = sorted_boxes(also_only.union(fraction_by_box))
        passed = 0
        for x, y, rgb, verdict in self._judged(boxes, also_only):
            if (x, y) in self._also:
                self._also_sink((x, y), rgb)
            if verdict is None:
                continue
            if not verdict.foreground_ok:  # the low-resolution mask overstated this tile's tissue
                self._rejected["background"] += 1
            elif self._passes(verdict):
                passed += 1
                yield self._record(x, y, fraction_by_box[(x, y)], verdict.blur), rgb
            else:
                reserve.offer(verdict.blur, (x, y), rgb)
        if not passed:
            yield from self._quality_fallback(reserve, plan)

    def _stream_all_cells(self, reserve: _Reserve) -> Iterator[tuple[TileRecord, np.ndarray]]:
        reader, extent = self.reader, self.extent
        # The view covers the complete cells of the centred grid only: the margins outside it are never read.
        width, height = (reader.width // extent) * extent, (reader.height // extent) * extent
        ox, oy = grid_origin(reader.width, reader.height, extent)
        if self.row_limit is not None:  # only the complete cells above the limit (at least one row)
            height = min(height, max(extent, (self.row_limit - oy) // extent * extent))
        factor = max(1.0, max(width, height) / self.settings.mask_max_side)
        canvas = np.zeros((max(1, int(np.ceil(height / factor))), max(1, int(np.ceil(width / factor))), 3), np.uint8)
        grid = [(ox + x, oy + y) for y in range(0, height, extent) for x in range(0, width, extent)]
        candidates = []
        for x, y, rgb, verdict in self._judged(grid):
            x0, y0 = round((x - ox) / factor), round((y - oy) / factor)
            x1 = min(canvas.shape[1], max(x0 + 1, round((x - ox + extent) / factor)))
            y1 = min(canvas.shape[0], max(y0 + 1, round((y - oy + extent) / factor)))
            canvas[y0:y1, x0:x1] = resize_area(rgb, x1 - x0, y1 - y0)
            if not verdict.foreground_ok:
                continue
            if self._passes(verdict):
                candidates.append((x, y))
                yield self._record(x, y, float("nan"), verdict.blur), rgb
            else:
                reserve.offer(verdict.blur, (x, y), rgb)
        self._set_view(_MaskView(canvas, detect_tissue(canvas, self.settings), (width, height), (ox, oy)))
        planned = set(self._plan.boxes)
        if not any(box in planned for box in candidates):  # the plan keeps none of the tiles that passed
            yield from self._quality_fallback(reserve, self._plan_view(max_tiles=0))

    def _set_view(self, view: _MaskView) -> None:
        """The mask's view and the tissue plan made on it (once: before the pass, or at its end)."""
        if view.masks.signal == INTENSITY:
            log.warning("%s: the image has no colour (greyscale, not H&E): tissue found by intensity, not "
                        "saturation; its embeddings are out of the encoder's colour domain", self.spec.slide_id)
        self._view = view
        if self.row_limit is not None and not self.streaming:  # the rows counted from the first with tissue
            rows = np.flatnonzero(view.masks.tissue.any(axis=1))
            first = int(rows[0] * view.size[1] / view.masks.tissue.shape[0]) if rows.size else 0
            band = max(self.row_limit, 2 * self.extent)  # at least two rows of cells hold tissue
            self.row_limit = min(view.origin[1] + view.size[1], band + view.origin[1] + first)
        self._plan = self._plan_view()
        self._fallback = self._plan.fallback

    def _plan_view(self, max_tiles: int | None = None) -> TilePlan:
        view, settings = self._view, self.settings
        tissue, foreground = self._above_row_limit(view.masks.tissue), self._above_row_limit(view.masks.foreground)
        plan = plan_tiles(
            tissue, foreground, *view.size, self.extent, float(settings.min_tissue_fraction),
            settings.max_tiles_per_slide if max_tiles is None else max_tiles, settings.sampling, self.seed,
            offset=view.origin,
        )
        if self.row_limit is None:
            return plan
        inside = plan.ys + self.extent <= max(self.row_limit, view.origin[1] + self.extent)
        return TilePlan(plan.xs[inside], plan.ys[inside], plan.tissue_fraction[inside], plan.extent, plan.fallback)

    def _above_row_limit(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` of the view with the rows below ``row_limit`` cleared (unchanged without a limit)."""
        view = self._view
        if self.row_limit is None or self.row_limit >= view.origin[1] + view.size[1]:
            return mask
        keep = max(1, int((self.row_limit - view.origin[1]) * mask.shape[0] / view.size[1]))
        limited = mask.copy()
        limited[keep:] = 0
        return limited

    def _quality_fallback(self, reserve: _Reserve, eligible: TilePlan) -> Iterator[tuple[TileRecord, np.ndarray]]:
        """Yield the reserve's tiles that lie in ``eligible``: they become what :meth:`finish` keeps, and
        the fallback note says why."""
        fraction_by_box = _fractions(eligible)
        tiles = reserve.tiles(fraction_by_box)
        if not tiles:
            return
        rejections = _quality_rejections(self._rejected["blur"], self._rejected["artefact"])
        why = f"{rejections}: kept the {len(tiles)} sharpest"
        self._fallback = "; ".join(filter(None, [self._fallback, why]))
        self._quality_fallback_tiles = len(tiles)
        self._keep = {box: fraction_by_box[box] for box, _, _ in tiles}
        for (x, y), score, rgb in tiles:
            yield self._record(x, y, fraction_by_box[(x, y)], score), rgb

    # --- other cells -----------------------------------------------------------------------------------

    def tissue_grid(self) -> CellGrid:
        """The tissue fraction of every cell of the centred grid (the mask's view of the slide): known
        when the tiler opens, or, when streaming, once the pass is over."""
        if self._view is None:
            raise TilerUsageError(f"{self.spec.slide_id}: the tissue mask is built in the decoding pass: read "
                                  f"the slide first (it is {self._state.value})")
        view = self._view
        ox, oy = grid_origin(*view.size, self.extent)
        values = cell_fractions(view.masks.tissue, *view.size, self.extent)
        return CellGrid(values, view.origin[0] + ox, view.origin[1] + oy, self.extent)

    def read_also(self, boxes: Iterable[tuple[int, int]], sink: Callable[[tuple[int, int], np.ndarray], None]) -> None:
        """Read these grid cells (level-0 corners, ``extent`` side) in the same pass as the tiles, giving
        each to ``sink(box, rgb)`` at the tile size (``rgb`` may be reused by the reader: copy it). Only
        before the pass, and only when the plan comes before it (not :attr:`streaming`: use
        :meth:`read_cells` after the pass then). The cells are never yielded as tiles unless planned."""
        if self.streaming or self._state is not _State.READY:
            raise TilerUsageError(f"{self.spec.slide_id}: read_also() needs the plan before the pass (streaming: "
                                  f"{self.streaming}; the slide is {self._state.value}): use read_cells() after it")
        self._also, self._also_sink = frozenset(boxes), sink

    def read_cells(self, boxes: Iterable[tuple[int, int]]) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """``(box, rgb)`` of these grid cells at the tile size, after the pass: a second read of the slide
        (for a PNG, a second decoding down to the last cell's row)."""
        if self._state not in (_State.READ, _State.FINISHED) or self._closed:
            raise TilerUsageError(f"{self.spec.slide_id}: read_cells() reads after the pass (the slide is "
                                  f"{self._state.value})")
        yield from self.reader.read_boxes(sorted_boxes(boxes), self.extent, self.settings.tile_size)

    # --- after the pass ---------------------------------------------------------------------------------

    def finish(self, records: Iterable[TileRecord]) -> list[TileRecord]:
        """The ``records`` (yielded by the pass) that the plan keeps, in their order, each with the plan's
        tissue fraction: all of them unless the mask was built while streaming. Call once, after the pass
        was drained; :attr:`info` is complete from then on."""
        if self._state is _State.FINISHED:
            raise TilerUsageError(f"{self.spec.slide_id}: finish() was already called")
        if self._state is not _State.READ:
            raise TilerUsageError(f"{self.spec.slide_id}: finish() needs the whole pass, but the slide is "
                                  f"{self._state.value}: iterate the tiler to its end first")
        records = list(records)
        for record in records:
            if self._yielded.get(record.box) is not record:
                raise TilerUsageError(f"{self.spec.slide_id}: finish() got a record this tiler's pass did not "
                                      f"yield: {record}")
        kept = [dataclasses.replace(record, tissue_fraction=round(float(self._keep[record.box]), 4))
                for record in records if record.box in self._keep]
        spec, reader = self.spec, self.reader
        self._info = SlideTilingInfo(
            source=spec.source, image_id=spec.image_id, label=spec.label, path=str(spec.path),
            width=reader.width, height=reader.height, mpp=reader.mpp, is_tma=self.is_tma,
            native_magnification=self.native_magnification, target_magnification=self.target_magnification,
            extent=self.extent, reader=type(reader).__name__, mask_source=self.mask_source,
            thumbnail_rejected=reader.thumbnail_rejected, tissue_signal=self._view.masks.signal,
            planned_tiles=len(self._plan), fallback=self._fallback, rejected_blur=self._rejected["blur"],
            rejected_artefact=self._rejected["artefact"], rejected_background=self._rejected["background"],
            quality_fallback_tiles=self._quality_fallback_tiles, streamed_not_kept=len(records) - len(kept),
            n_tiles=len(kept),
        )
        self._state = _State.FINISHED
        return kept

    @property
    def info(self) -> SlideTilingInfo:
        """The slide's tiling facts, known once :meth:`finish` has run."""
        if self._info is None:
            raise TilerUsageError(f"{self.spec.slide_id}: info is complete only after finish() "
                                  f"(the slide is {self._state.value})")
        return self._info

    def qc_overlay(self, kept: Sequence[TileRecord]) -> np.ndarray:
        """The QC picture: the low-resolution view, the tissue mask tinted, the ``kept`` tiles outlined."""
        if self._state is not _State.FINISHED:
            raise TilerUsageError(f"{self.spec.slide_id}: qc_overlay() draws the kept tiles: call finish() first")
        view = self._view
        return draw_overlay(view.low_res, view.masks.tissue, [record.box for record in kept], self.extent,
                            view.size, view_origin=view.origin)

    # --- resources ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop a pass left half-way and release the slide (the results of :meth:`finish` stay)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._pass is not None:
                self._pass.close()
        finally:
            self.reader.close()

    def __enter__(self) -> SlideTiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_size(spec: SlideSpec, reader: SlideReader) -> None:
    if spec.expected_size is None:
        return
    expected = tuple(int(v) for v in spec.expected_size)
    if expected != (reader.width, reader.height):
        raise SlideError(
            f"size mismatch: CSV says {expected[0]}x{expected[1]}, file is {reader.width}x{reader.height}"
        )
