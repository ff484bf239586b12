"""One reader interface over pyramidal slides (openslide) and any other image libvips reads (PNG, plain
or strip TIFF, JPEG, ...), streaming.

The tiler asks a reader for a low-resolution view (for the tissue mask) and for square level-0 boxes,
row by row, resized to the tile size. Non-pyramidal images are decoded once, top to bottom, in strips:
memory follows the slide's width, never its area. Small images without a usable thumbnail (TMAs) are
decoded whole, once, instead. A thumbnail stands for its image only when it decodes completely and has
the image's aspect ratio; otherwise the reader says why (``thumbnail_rejected``) and the image's own
pixels give the view.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby
from pathlib import Path

import cv2
import numpy as np

from ubc_ocean.memory import limit_malloc_arenas

log = logging.getLogger(__name__)

PYRAMIDAL_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
THUMBNAIL_ASPECT_TOLERANCE = 0.02  # the default of slides.thumbnail_aspect_tolerance


class SlideError(RuntimeError):
    """A slide that cannot be read as asked (missing, corrupt, wrong size, unsupported)."""


class UnsupportedBySlideLibrary(SlideError):
    """openslide does not know the file's format (a plain TIFF, say): libvips may still read it."""


def resize_area(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Shrink (area-average) or enlarge an RGB array to ``width`` x ``height``."""
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    return cv2.resize(rgb, (max(1, width), max(1, height)), interpolation=cv2.INTER_AREA)


def resize_to(tile: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB array to ``size`` x ``size`` (area interpolation when shrinking)."""
    if tile.shape[0] == size and tile.shape[1] == size:
        return tile
    shrinking = tile.shape[0] > size
    return cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


class SlideReader(ABC):
    """A slide's level-0 size, optional physical metadata and the two reads the tiler needs."""

    path: Path
    width: int
    height: int
    mpp: float | None = None
    objective_power: float | None = None
    has_low_resolution_view: bool = True  # False: a low-res view would cost a full decoding pass
    thumbnail_rejected: str = ""  # why a thumbnail given with the slide does not stand for it ('' if none)

    @abstractmethod
    def low_resolution(self, max_side: int) -> np.ndarray:
        """An RGB uint8 view of the whole slide whose longest side is at most ``max_side``."""

    @abstractmethod
    def read_boxes(
        self, boxes: Sequence[tuple[int, int]], extent: int, out_size: int
    ) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """Yield ``((x, y), rgb)`` for square level-0 boxes of side ``extent``, resized to ``out_size``.

        ``boxes`` must be sorted by (y, x); every box lies inside the slide.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


STRIP_ALIGN = 64  # lines; a multiple of libvips' 16-line PNG and 8- or 16-line JPEG decoding chunks
# Loaders that read any strip or tile on demand, never decoding the whole image: they are opened for random
# access, since a sequential TIFF read must stop on its strips' boundaries (which libvips does not report).
RANDOM_ACCESS_LOADERS = {"tiffload"}


def _to_rgb_vips(image):  # type: ignore[no-untyped-def]
    """Any pyvips image to 8-bit, 3-band sRGB (alpha flattened onto white)."""
    if image.format == "ushort":  # 16-bit PNG: keep the high byte (a plain cast would clip it all to white)
        image = (image >> 8).cast("uchar").copy(interpretation="srgb" if image.bands >= 3 else "b-w")
    if image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    if image.bands < 3:
        image = image.colourspace("srgb")
    if image.format != "uchar":
        image = image.cast("uchar")
    if image.bands > 3:
        image = image.extract_band(0, n=3)
    return image


class VipsSlide(SlideReader):
    """Any image libvips reads (PNG, plain or strip TIFF, JPEG, ...), read in one streaming pass, top to
    bottom (sequential access, except for the loaders in ``RANDOM_ACCESS_LOADERS``). Its low-resolution
    view is its ``thumbnail`` when that decodes completely and has the image's aspect ratio (within
    ``thumbnail_aspect_tolerance``, relative); else :attr:`thumbnail_rejected` says why and the reader has
    no cheap view. No mpp: the scale comes from the source's configuration."""

    def __init__(self, path: str | Path, thumbnail: str | Path | None = None,
                 thumbnail_aspect_tolerance: float = THUMBNAIL_ASPECT_TOLERANCE):
        import pyvips

        self.path = Path(path)
        try:
            header = pyvips.Image.new_from_file(str(self.path), access="sequential")
        except pyvips.Error as err:
            raise SlideError(f"cannot open: {_error_text(err)}") from err
        self.width, self.height = header.width, header.height
        loader = header.get("vips-loader") if header.get_typeof("vips-loader") else ""
        self._access = "random" if loader in RANDOM_ACCESS_LOADERS else "sequential"
        self.thumbnail_path: Path | None = None
        self._thumbnail = None  # the thumbnail, decoded whole (a few MB): the view is made from it
        if thumbnail is not None and Path(thumbnail).is_file():
            self._thumbnail, self.thumbnail_rejected = _load_thumbnail(
                Path(thumbnail), self.width, self.height, thumbnail_aspect_tolerance)
            self.thumbnail_path = Path(thumbnail) if self._thumbnail is not None else None
        self.has_low_resolution_view = self._thumbnail is not None

    def _open(self):  # type: ignore[no-untyped-def]
        import pyvips

        # Streaming reads are never repeated: libvips' operation cache would only pin decoded strips. PNG
        # decoding is serial, so extra libvips worker threads would only add strip-sized buffers; slides
        # run in parallel as processes (--workers) instead.
        pyvips.cache_set_max(0)
        if hasattr(pyvips, "concurrency_set"):  # pyvips >= 3.2; with older ones libvips keeps its thread count
            pyvips.concurrency_set(1)
        # fail_on="error" turns truncated or corrupt data into an error instead of grey rows.
        image = pyvips.Image.new_from_file(str(self.path), access=self._access, fail_on="error")
        return _to_rgb_vips(image)

    def low_resolution(self, max_side: int) -> np.ndarray:
        import pyvips

        if self._thumbnail is not None:  # decoded and checked when the slide was opened
            image = self._thumbnail.thumbnail_image(max_side, height=max_side, size="down")
            return _to_rgb_vips(image).numpy()
        try:  # no usable thumbnail: a whole decoding pass of the image itself
            image = pyvips.Image.thumbnail(str(self.path), max_side, height=max_side, size="down", fail_on="error")
            return _to_rgb_vips(image).numpy()
        except pyvips.Error as err:
            raise SlideError(f"truncated or corrupt image data: {_error_text(err)}") from err

    def close(self) -> None:
        self._thumbnail = None

    def read_all(self) -> np.ndarray:
        """The whole image as one RGB array, decoded once (for images small enough to hold)."""
        import pyvips

        try:
            return self._open().numpy()
        except pyvips.Error as err:
            raise SlideError(f"truncated or corrupt image data: {_error_text(err)}") from err

    def read_boxes(
        self, boxes: Sequence[tuple[int, int]], extent: int, out_size: int
    ) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        import pyvips

        if not boxes:
            return
        left, right = min(x for x, _ in boxes), max(x for x, _ in boxes) + extent
        try:
            image = self._open()
            rows = [(y, list(row)) for y, row in groupby(boxes, key=lambda box: box[1])]
            strips = self._strips(image, [y for y, _ in rows], extent, left, right - left)
            for (y, row_boxes), (top, bottom) in zip(rows, strips, strict=True):
                for x, _ in row_boxes:
                    columns = slice(x - left, x - left + extent)
                    tile = np.concatenate([top[:, columns], bottom[:, columns]])  # a contiguous copy
                    yield (x, y), resize_to(tile, out_size)
                del top, bottom, tile  # free this strip before libvips decodes the next one
        except pyvips.Error as err:
            raise SlideError(f"truncated or corrupt image data: {_error_text(err)}") from err

    def _strips(
        self, image, rows: Sequence[int], extent: int, left: int, width: int  # type: ignore[no-untyped-def]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Lines ``[y, y + extent)`` of columns ``[left, left + width)`` for each ``y`` of the sorted
        ``rows``, as a ``(top, bottom)`` pair of line blocks to stack.

        libvips decodes a sequential image in chunks of lines (16 for a PNG, a strip for a TIFF, an MCU row
        for a JPEG) and cannot go back: a read that starts inside a chunk already decoded fails ("out of
        order read"). So every read starts where the previous one
        stopped and stops on a multiple of ``STRIP_ALIGN`` lines; the few lines read past a row's end are
        kept (copied, so the decoded strip itself can go) as the next row's ``top``.
        """
        carry, decoded = np.zeros((0, width, 3), np.uint8), 0  # carry: lines [decoded - len(carry), decoded)
        for y in rows:
            stop = max(decoded, min(self.height, -(-(y + extent) // STRIP_ALIGN) * STRIP_ALIGN))
            start = max(y, decoded)
            fresh = image.crop(left, start, width, stop - start).numpy() if stop > start else carry[:0]
            held = carry[len(carry) - (decoded - y) :] if y < decoded else carry[:0]  # lines [y, decoded)
            if len(held) >= extent:  # the whole row was read with the previous one (rows < STRIP_ALIGN apart)
                yield held[:extent], fresh
                rest = held[extent:]
            else:
                yield held, fresh[: extent - len(held)]
                rest = fresh[extent - len(held) :]
            carry, decoded = rest.copy(), stop
            del fresh, rest, held


class PngSlide(VipsSlide):
    """A PNG (the competition's images): a :class:`VipsSlide` under its own name, which ``slide.json``
    records as the reader."""


class InMemorySlide(SlideReader):
    """An image held whole in memory: its low-resolution view is a shrink of the pixels themselves, so
    the tiler plans before cutting and reads only the planned tiles (no streamed candidates)."""

    def __init__(self, path: str | Path, rgb: np.ndarray, thumbnail_rejected: str = ""):
        self.path = Path(path)
        self.rgb = rgb
        self.height, self.width = rgb.shape[:2]
        self.thumbnail_rejected = thumbnail_rejected

    def low_resolution(self, max_side: int) -> np.ndarray:
        scale = min(1.0, max_side / max(self.width, self.height))  # never enlarged, as a pyvips thumbnail
        return resize_area(self.rgb, max(1, round(self.width * scale)), max(1, round(self.height * scale)))

    def read_boxes(
        self, boxes: Sequence[tuple[int, int]], extent: int, out_size: int
    ) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        for x, y in boxes:
            yield (x, y), resize_to(np.ascontiguousarray(self.rgb[y : y + extent, x : x + extent]), out_size)

    def close(self) -> None:
        self.rgb = np.zeros((0, 0, 3), np.uint8)


class OpenSlideSlide(SlideReader):
    """A pyramidal slide (svs, tiff, ndpi, mrxs, ...) through openslide, reading from the best level."""

    def __init__(self, path: str | Path):
        import openslide

        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as err:
            raise UnsupportedBySlideLibrary(f"openslide cannot open it: {_error_text(err)}") from err
        except openslide.OpenSlideError as err:
            raise SlideError(f"openslide cannot open it: {_error_text(err)}") from err
        self.width, self.height = self._slide.dimensions
        props = self._slide.properties
        self.mpp = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        self.objective_power = _positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))

    def low_resolution(self, max_side: int) -> np.ndarray:
        return np.asarray(self._slide.get_thumbnail((max_side, max_side)).convert("RGB"))

    def read_boxes(
        self, boxes: Sequence[tuple[int, int]], extent: int, out_size: int
    ) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        downsample = extent / out_size
        level = self._slide.get_best_level_for_downsample(downsample)
        level_downsample = self._slide.level_downsamples[level]
        read_size = max(1, round(extent / level_downsample))
        for x, y in boxes:
            region = self._slide.read_region((x, y), level, (read_size, read_size))
            yield (x, y), resize_to(_rgba_on_white(np.asarray(region)), out_size)

    def close(self) -> None:
        self._slide.close()


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite openslide's RGBA onto white: unscanned areas are transparent, glass is white."""
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.clip(rgb * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)


def _positive_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _error_text(err: BaseException) -> str:
    """A library error on one line (libvips puts the cause on the lines after its summary)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(err).__name__


def open_slide(
    path: str | Path,
    thumbnail: str | Path | None = None,
    in_memory_max_pixels: int = 0,
    thumbnail_aspect_tolerance: float = THUMBNAIL_ASPECT_TOLERANCE,
) -> SlideReader:
    """Open ``path`` with the right reader: openslide for pyramidal formats; libvips, streaming, for other
    images and for the files with a pyramidal suffix that openslide refuses (a plain or strip TIFF). A
    non-pyramidal image without a usable ``thumbnail`` and of at most ``in_memory_max_pixels`` pixels (a
    TMA) is decoded whole, once, into an :class:`InMemorySlide`."""
    limit_malloc_arenas()  # before libvips or tile writers start threads
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"file not found: {path}")
    refused = ""
    if path.suffix.lower() in PYRAMIDAL_SUFFIXES:
        try:
            return OpenSlideSlide(path)
        except UnsupportedBySlideLibrary as err:
            refused = str(err)
    reader_class = PngSlide if path.suffix.lower() == ".png" else VipsSlide
    try:
        image = reader_class(path, thumbnail=thumbnail, thumbnail_aspect_tolerance=thumbnail_aspect_tolerance)
    except SlideError as err:
        if not refused:
            raise
        raise SlideError(f"{refused}; libvips {err}") from err
    if not image.has_low_resolution_view and image.width * image.height <= in_memory_max_pixels:
        return InMemorySlide(path, image.read_all(), thumbnail_rejected=image.thumbnail_rejected)
    return image


def aspect_mismatch(thumbnail_size: tuple[int, int], image_size: tuple[int, int], tolerance: float) -> bool:
    """True when a ``(width, height)`` thumbnail cannot be a shrink of the image: its aspect ratio differs
    from the image's by more than ``tolerance`` (relative) and by more than rounding to whole pixels."""
    (tw, th), (width, height) = thumbnail_size, image_size
    if abs(th - tw * height / width) <= 1 or abs(tw - th * width / height) <= 1:  # rounded, not distorted
        return False
    return abs((tw / th) / (width / height) - 1.0) > tolerance


def _load_thumbnail(path: Path, width: int, height: int, tolerance: float):  # type: ignore[no-untyped-def]
    """``(thumbnail decoded whole, '')``, or ``(None, why it cannot stand for the width x height image)``."""
    import pyvips

    if path.stat().st_size == 0:
        return None, "unreadable: empty file (0 bytes)"
    try:
        header = pyvips.Image.new_from_file(str(path), access="sequential", fail_on="error")
        if aspect_mismatch((header.width, header.height), (width, height), tolerance):
            return None, f"aspect {header.width / header.height:.3f} vs image {width / height:.3f}"
        return header.copy_memory(), ""  # truncated or corrupt data fails here, before any tile is planned
    except pyvips.Error as err:
        return None, f"unreadable: {_error_text(err)}"


def sorted_boxes(boxes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Row-major order (by y, then x): the order a streaming reader needs."""
    return sorted(boxes, key=lambda box: (box[1], box[0]))
