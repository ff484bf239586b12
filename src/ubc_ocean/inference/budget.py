"""A time budget for stage 05: which slide next, and how much of it, so the whole set ends in time.

The cost model, with rates measured on the images done so far (priors until then)::

    decode time of an image   TMA: tma_decode_s each;   WSI: decode_s_per_mpx x megapixels decoded
    encode time of an image   encode_s_per_tile x tiles  (tiles: min(cap, tiles_per_mpx x megapixels decoded))
    time left                 max(sum decode / decoders, sum encode / consumers)   pipelined (they overlap)
                              sum decode + sum encode                              in one process

Images go cheapest first (TMAs, then WSIs by size), so a run cut short has predicted as many as it could.
Before each image the plan is made again for every image not yet started: full cost when it fits; else
one tile cap for every WSI (down to ``min_tiles``); else, with that floor, one cap on the megapixels any
WSI decodes, so that the largest WSIs are read only down to a fraction of their rows (a PNG is decoded in
order and the reader stops after the last tile it needs). An image that cannot end before the deadline
even so is not started; when the deadline comes, images in flight are abandoned. Left-out images are
labelled by the submission's fallback (:mod:`ubc_ocean.submit.submission`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
MPX = 1e6

# Priors, replaced by measurements as images complete (one decoder process, one consumer).
PRIOR_TMA_DECODE_S = 1.0        # a ~3000x3000 TMA PNG: decode, mask, tiles
PRIOR_DECODE_S_PER_MPX = 0.03   # PNG decoding and tiling, per megapixel
PRIOR_ENCODE_S_PER_TILE = 0.01  # the encoder, per tile
PRIOR_TILES_PER_MPX = 4.0       # tissue tiles per megapixel of a WSI (before the cap)
PRIOR_TMA_TILES = 30.0
PLAN_MARGIN = 0.9               # plans fill this share of the time left: room for the estimates' error
UNMEASURED_WSI_FACTOR = 1.5     # WSIs' decoding per megapixel, until one is measured: TMAs' rate times this
                                # (a WSI streams, and builds its mask; a TMA is decoded whole, in memory)


@dataclass(frozen=True)
class BudgetImage:
    """One image to plan: its id, its size in pixels (``test.csv``) and whether it is a TMA."""

    key: str
    pixels: int
    is_tma: bool


@dataclass(frozen=True)
class Mode:
    """How much of one image to embed: ``max_tiles`` (None: the configured cap) and the fraction of its
    rows to decode (1: all)."""

    max_tiles: int | None = None
    row_fraction: float = 1.0

    @property
    def full(self) -> bool:
        return self.max_tiles is None and self.row_fraction >= 1.0


@dataclass
class Rates:
    """Measured rates as ratios of sums, each falling back on its prior until it has data."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("tma_n", "tma_decode_s", "tma_tiles", "px", "decode_s", "wsi_px", "wsi_decode_s", "wsi_full_px",
         "wsi_full_tiles", "tiles", "encode_s"), 0.0))

    def add(self, image: BudgetImage, mode: Mode, decode_s: float, decoded_pixels: int, tiles: int,
            encode_s: float) -> None:
        s = self.sums
        s["px"] += decoded_pixels
        s["decode_s"] += decode_s
        s["tiles"] += tiles
        s["encode_s"] += encode_s
        if image.is_tma:
            s["tma_n"] += 1
            s["tma_decode_s"] += decode_s
            s["tma_tiles"] += tiles
        else:
            s["wsi_px"] += decoded_pixels
            s["wsi_decode_s"] += decode_s
            if mode.max_tiles is None:  # an uncapped image tells how many tissue tiles a megapixel holds
                s["wsi_full_px"] += decoded_pixels
                s["wsi_full_tiles"] += tiles

    def ratio(self, numerator: str, denominator: str, prior: float, scale: float = 1.0) -> float:
        """``scale * sums[numerator] / sums[denominator]``, or ``prior`` while the denominator is 0."""
        s = self.sums
        return scale * s[numerator] / s[denominator] if s[denominator] else prior

    @property
    def tma_decode_s(self) -> float:
        return self.ratio("tma_decode_s", "tma_n", PRIOR_TMA_DECODE_S)

    @property
    def decode_s_per_mpx(self) -> float:
        """WSIs' own rate once one is done; before that every image's (TMAs decode PNG too)."""
        if self.sums["wsi_px"]:
            return self.ratio("wsi_decode_s", "wsi_px", PRIOR_DECODE_S_PER_MPX, MPX)
        return self.ratio("decode_s", "px", PRIOR_DECODE_S_PER_MPX, UNMEASURED_WSI_FACTOR * MPX)

    @property
    def encode_s_per_tile(self) -> float:
        return self.ratio("encode_s", "tiles", PRIOR_ENCODE_S_PER_TILE)

    @property
    def tiles_per_mpx(self) -> float:
        return self.ratio("wsi_full_tiles", "wsi_full_px", PRIOR_TILES_PER_MPX, MPX)

    @property
    def tma_tiles(self) -> float:
        return self.ratio("tma_tiles", "tma_n", PRIOR_TMA_TILES)


@dataclass(frozen=True)
class Plan:
    """The modes for the images not yet started: a tile cap and a decoded-megapixel cap for WSIs (None:
    none), the estimated seconds they take and the seconds left."""

    tile_cap: int | None
    mpx_cap: float | None
    estimate_s: float
    left_s: float

    @property
    def fits(self) -> bool:
        return self.estimate_s <= self.left_s

    def describe(self) -> str:
        if self.tile_cap is None and self.mpx_cap is None:
            mode = "full cost"
        else:
            mode = f"WSIs capped at {self.tile_cap} tiles"
            mode += f" and {self.mpx_cap:.0f} decoded megapixels" if self.mpx_cap is not None else ""
        verdict = "fits" if self.fits else "does NOT fit: the last images will be left out"
        return f"{mode}, estimated {self.estimate_s / 60:.1f} min of {self.left_s / 60:.1f} min left ({verdict})"


class BudgetPlanner:
    """Hands out images cheapest first, each with the mode the current plan gives it (see the module).

    ``budget_s`` None: no budget, every image at full cost. ``clock`` is injectable (tests simulate it);
    the deadline is ``start + budget_s``.
    """

    def __init__(self, images: Sequence[BudgetImage], budget_s: float | None, *, full_tiles: int, min_tiles: int,
                 decoders: int = 1, consumers: int = 1, pipelined: bool = False,
                 clock: Callable[[], float] = time.monotonic, start: float | None = None):
        self.queue = sorted(images, key=lambda i: (not i.is_tma, i.pixels, i.key))
        self.total = len(self.queue)
        self.budget_s = budget_s
        self.full_tiles = int(full_tiles) if full_tiles > 0 else 1 << 30
        self.min_tiles = max(1, min(int(min_tiles), self.full_tiles))
        self.decoders, self.consumers, self.pipelined = max(1, decoders), max(1, consumers), pipelined
        self.clock = clock
        self.start = clock() if start is None else start
        self.deadline = None if budget_s is None else self.start + float(budget_s)
        self.rates = Rates()
        self.modes: dict[str, Mode] = {}
        self.skipped: list[BudgetImage] = []
        self.done = 0
        self._last_log = -float("inf")

    # --- the cost model --------------------------------------------------------------------------------

    def _decoded_mpx(self, image: BudgetImage, mpx_cap: float | None) -> float:
        mpx = image.pixels / MPX
        return mpx if mpx_cap is None or image.is_tma else min(mpx, mpx_cap)

    def _tiles(self, image: BudgetImage, tile_cap: int | None, mpx_cap: float | None) -> float:
        if image.is_tma:
            return self.rates.tma_tiles
        cap = self.full_tiles if tile_cap is None else tile_cap
        return min(cap, self.rates.tiles_per_mpx * self._decoded_mpx(image, mpx_cap))

    def _decode_s(self, image: BudgetImage, mpx_cap: float | None) -> float:
        if image.is_tma:
            return self.rates.tma_decode_s
        return self.rates.decode_s_per_mpx * self._decoded_mpx(image, mpx_cap)

    def estimate_s(self, images: Sequence[BudgetImage], tile_cap: int | None, mpx_cap: float | None) -> float:
        """Seconds ``images`` take with these caps, on ``decoders`` processes and ``consumers`` devices."""
        decode = sum(self._decode_s(i, mpx_cap) for i in images) / self.decoders
        encode = sum(self._tiles(i, tile_cap, mpx_cap) for i in images) * self.rates.encode_s_per_tile / self.consumers
        return max(decode, encode) if self.pipelined else decode + encode

    def left_s(self) -> float:
        """Seconds the plans may fill: ``PLAN_MARGIN`` of those left before the deadline."""
        return float("inf") if self.deadline is None else PLAN_MARGIN * (self.deadline - self.clock())

    def plan(self) -> Plan:
        """The caps for the images not yet started: none if they fit, else the mildest that fit."""
        images, left = self.queue, self.left_s()
        full = self.estimate_s(images, None, None)
        if full <= left:
            return Plan(None, None, full, left)
        cap = self._largest(lambda c: self.estimate_s(images, c, None) <= left, self.min_tiles, self.full_tiles)
        if cap is not None:
            return Plan(cap, None, self.estimate_s(images, cap, None), left)
        floor_mpx = self.min_tiles / self.rates.tiles_per_mpx
        top_mpx = max((i.pixels / MPX for i in images if not i.is_tma), default=floor_mpx)
        mpx = self._largest(lambda m: self.estimate_s(images, self.min_tiles, m) <= left,
                            int(floor_mpx), int(top_mpx) + 1)
        mpx_cap = float(mpx) if mpx is not None else floor_mpx
        return Plan(self.min_tiles, mpx_cap, self.estimate_s(images, self.min_tiles, mpx_cap), left)

    @staticmethod
    def _largest(ok: Callable[[int], bool], low: int, high: int) -> int | None:
        """The largest integer in [low, high] for which ``ok`` holds (monotone), None when none does."""
        if high < low or not ok(low):
            return None
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if ok(middle) else (low, middle - 1)
        return low

    # --- handing out images ----------------------------------------------------------------------------

    def next(self) -> tuple[BudgetImage, Mode] | None:
        """The next image and its mode, or None: all handed out, or no image left can end in time (those
        are recorded in :attr:`skipped`)."""
        if not self.queue:
            return None
        if self.deadline is None:
            self._log_eta()
            image = self.queue.pop(0)
            self.modes[image.key] = Mode()
            return image, self.modes[image.key]
        plan = self.plan()
        self._log_plan(plan)
        while self.queue:
            image = self.queue.pop(0)
            mode = self._mode(image, plan)
            if self._image_s(image, mode) > self.left_s():  # the plan is behind: as much as still ends in time
                mode = self._squeezed(image)
            if mode is not None:
                self.modes[image.key] = mode
                return image, mode
            self.skipped.append(image)
            log.debug("time budget: %s not started, it cannot end before the deadline", image.key)
        return None

    def _mode(self, image: BudgetImage, plan: Plan) -> Mode:
        if image.is_tma or (plan.tile_cap is None and plan.mpx_cap is None):
            return Mode()
        fraction = 1.0
        if plan.mpx_cap is not None and image.pixels / MPX > plan.mpx_cap:
            fraction = max(plan.mpx_cap * MPX / image.pixels, 1e-3)
        cap = plan.tile_cap if plan.tile_cap is not None and plan.tile_cap < self.full_tiles else None
        return Mode(cap, fraction)

    def _squeezed(self, image: BudgetImage) -> Mode | None:
        """The largest share of a WSI's rows (at ``min_tiles``) that ends before the deadline, if any."""
        if image.is_tma:
            return None
        left = self.left_s()
        steps = self._largest(lambda k: self._image_s(image, Mode(self.min_tiles, k / 1000)) <= left, 1, 1000)
        return None if steps is None else Mode(self.min_tiles, steps / 1000)

    def _image_s(self, image: BudgetImage, mode: Mode) -> float:
        """Seconds one image takes in ``mode`` on one decoder and one consumer."""
        mpx_cap = None if mode.row_fraction >= 1.0 else image.pixels * mode.row_fraction / MPX
        decode = self._decode_s(image, mpx_cap)
        encode = self._tiles(image, mode.max_tiles, mpx_cap) * self.rates.encode_s_per_tile
        return max(decode, encode) if self.pipelined else decode + encode

    def give_up(self) -> list[BudgetImage]:
        """Every image not handed out yet, recorded as skipped (the deadline came)."""
        left, self.queue = self.queue, []
        self.skipped += left
        return left

    def observe(self, image: BudgetImage, decode_s: float, decoded_pixels: int, tiles: int, encode_s: float) -> None:
        """A finished image's measured costs, for the next plans."""
        self.rates.add(image, self.modes.get(image.key, Mode()), decode_s, decoded_pixels, tiles, encode_s)
        self.done += 1

    def expired(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def _log_due(self, every_s: float = 30.0) -> bool:
        """True at the first image and then every ``every_s`` seconds (the progress log's pace)."""
        now = self.clock()
        if now - self._last_log < every_s and self.done:
            return False
        self._last_log = now
        return True

    def _log_plan(self, plan: Plan) -> None:
        if self._log_due():
            log.info("time budget: %d/%d images done, %.1f min elapsed; plan for the %d left: %s (rates %s)",
                     self.done, self.total, (self.clock() - self.start) / 60, len(self.queue), plan.describe(),
                     self._rates_source())

    def _log_eta(self) -> None:
        """Without a budget, the ETA: the images not started at the rates measured so far (priors before)."""
        if self._log_due():
            log.info("stage 05: %d/%d images done, %.1f min elapsed; the %d not started need about %.1f min "
                     "(rates %s)", self.done, self.total, (self.clock() - self.start) / 60, len(self.queue),
                     self.estimate_s(self.queue, None, None) / 60, self._rates_source())

    def _rates_source(self) -> str:
        return "measured so far" if self.done else "assumed: no image measured yet"
