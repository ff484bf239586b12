"""What stage 05's decoder processes run, and nothing more: reading a raw slide through the stage-01 tiler
into uint8 tile batches (:class:`SlideBatches`), and handing each batch to the encoding process through
shared memory (:func:`share_batch`, :func:`receive_batch`). It imports neither torch nor timm, so a decoder
process holds only what decoding needs (``tests/test_architecture.py``); the encoding side is
:mod:`ubc_ocean.inference.pipeline`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from ubc_ocean.config import ConfigError
from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.parallel import one_line
from ubc_ocean.slides import SlideError
from ubc_ocean.sources import SlideSpec
from ubc_ocean.tile_store import round_trip
from ubc_ocean.tiling.tiler import SlideTiler, TileRecord

# Shared-memory blocks are named after the decoder process that made them: ubco<pid>_<n>. The receiver
# unlinks each one it takes; FusedPipeline removes what a run left (batches in queues when it stopped, a
# decoder killed between making a block and sending it) with :func:`remove_batches_of`.
SEGMENT_PREFIX = "ubco"
_segments = itertools.count()


@dataclass(frozen=True)
class SlideJob:
    """One slide to embed, and how much of it: ``max_tiles`` (None: ``tiling.max_tiles_per_slide``) and
    ``row_fraction`` (< 1: only the tiles in that fraction of its rows from the top, or from the first
    row with tissue when a thumbnail shows it, so a PNG is decoded only that far). Anything but the
    defaults is a time budget's lower-cost mode."""

    spec: SlideSpec
    max_tiles: int | None = None
    row_fraction: float = 1.0

    @property
    def reduced(self) -> bool:
        return self.max_tiles is not None or self.row_fraction < 1.0

    def describe(self) -> str:
        """``full``, or the lower-cost mode in words (recorded with the embeddings)."""
        if not self.reduced:
            return "full"
        parts = [f"max {self.max_tiles} tiles"] if self.max_tiles is not None else []
        parts += [f"top {self.row_fraction:.0%} of rows"] if self.row_fraction < 1.0 else []
        return ", ".join(parts)


@dataclass
class TiledSlide:
    """What the tiling pass of one slide found, known once its batches are all out: which yielded tiles
    the plan keeps (``keep``, over the tiles in batch order), their coords, the slide facts, and the CPU
    seconds the pass took (waiting on the consumer not counted) for the pixels it decoded."""

    keep: np.ndarray
    coords: np.ndarray
    info: dict
    decode_s: float
    decoded_pixels: int
    n_batches: int


class SlideBatches:
    """uint8 tile batches [B, T, T, 3] of one slide, each tile as stage 03 sees a stored training tile
    (``tiling.format`` jpg: the same JPEG encode and decode, :func:`~ubc_ocean.tile_store.round_trip`).
    Fused mode embeds test images only, so no tile is ever stain-jittered (``features.stain_augmentation``
    augments training tiles, in stage 03). Iterate once; then :attr:`result`."""

    def __init__(self, job: SlideJob, cfg: Mapping):
        self.job, self.cfg = job, cfg
        self.result: TiledSlide | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        job, cfg = self.job, self.cfg
        started = time.perf_counter()
        spent = 0.0
        settings = TilingSettings.from_config(cfg)
        if job.max_tiles is not None:
            settings = dataclasses.replace(settings, max_tiles_per_slide=int(job.max_tiles))
        fmt, quality = str(settings.format), int(settings.jpeg_quality)
        records: list[TileRecord] = []
        n_batches = 0
        with SlideTiler(job.spec, settings, row_limit=self._row_limit()) as tiler:

            def tiles() -> Iterator[np.ndarray]:
                for record, rgb in tiler:
                    records.append(record)
                    yield round_trip(rgb, fmt, quality)

            for chunk in chunked(tiles(), int(cfg["features"]["batch_size"])):
                batch = np.stack(chunk)
                n_batches += 1
                spent += time.perf_counter() - started
                yield batch
                started = time.perf_counter()
            kept = tiler.finish(records)
            width, rows = tiler.reader.width, min(tiler.reader.height, tiler.row_limit or tiler.reader.height)
        if not kept:
            raise SlideError(tiler.info.no_tiles_message())
        kept_boxes = {record.box for record in kept}
        self.result = TiledSlide(
            keep=np.array([record.box in kept_boxes for record in records], dtype=bool),
            coords=np.array([[r.x, r.y] for r in kept], dtype=np.int64).reshape(-1, 2),
            info={**tiler.info.to_dict(), "inference_mode": job.describe()},
            decode_s=spent + time.perf_counter() - started, decoded_pixels=int(width) * int(rows),
            n_batches=n_batches,
        )

    def _row_limit(self) -> int | None:
        spec = self.job.spec
        if self.job.row_fraction >= 1.0 or spec.expected_size is None:
            return None
        return max(1, round(float(self.job.row_fraction) * int(spec.expected_size[1])))


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Group an iterable into lists of ``size`` (the last may be shorter)."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def unexpected_error(err: BaseException) -> str:
    """The type name of an error no bad slide explains (a bug, a broken install), else ""."""
    return "" if isinstance(err, (SlideError, OSError, ValueError)) else type(err).__name__


def failure_message(job: SlideJob, err: BaseException) -> str:
    """One line naming the file: the error's own text for a bad slide, type and text for anything else."""
    text = one_line(str(err)) or "(no message)"
    kind = unexpected_error(err)
    return f"{job.spec.path.name}: {f'unexpected {kind}: ' if kind else ''}{text}"


def share_batch(batch: np.ndarray) -> tuple[str, tuple[int, ...]]:
    """Copy a uint8 batch into a new shared-memory block; the message that carries it: ``(name, shape)``.
    The receiver (:func:`receive_batch`) unlinks the block."""
    batch = np.ascontiguousarray(batch, dtype=np.uint8)
    block = shared_memory.SharedMemory(name=f"{SEGMENT_PREFIX}{os.getpid()}_{next(_segments)}", create=True,
                                       size=max(1, batch.nbytes))
    try:
        np.ndarray(batch.shape, np.uint8, buffer=block.buf)[...] = batch
    finally:
        block.close()
    return block.name, tuple(batch.shape)


def receive_batch(handle: tuple[str, tuple[int, ...]]) -> np.ndarray:
    """The batch a decoder shared (a copy in this process's memory); its block is unlinked. Raises
    ``FileNotFoundError`` when the block is gone."""
    name, shape = handle
    block = shared_memory.SharedMemory(name=name)
    try:
        view = np.ndarray(shape, np.uint8, buffer=block.buf)
        batch = view.copy()
        del view  # the block cannot close while an array still points into it
    finally:
        block.close()
        block.unlink()
    return batch


def remove_batches_of(pids: Iterable[int]) -> int:
    """Unlink every shared batch block the decoder processes ``pids`` made that no one received (Linux, where
    blocks are files in /dev/shm; elsewhere the resource tracker removes them when the run's process ends).
    Returns how many were removed."""
    folder = "/dev/shm"
    if not sys.platform.startswith("linux") or not os.path.isdir(folder):
        return 0
    prefixes = tuple(f"{SEGMENT_PREFIX}{pid}_" for pid in set(pids))
    removed = 0
    for entry in os.listdir(folder) if prefixes else ():
        if entry.startswith(prefixes):
            try:
                block = shared_memory.SharedMemory(name=entry)
            except FileNotFoundError:  # received meanwhile
                continue
            block.close()
            block.unlink()
            removed += 1
    return removed


def decode_slides(cfg: Mapping, jobs: Any, batches: Any) -> None:
    """A decoder process: each job's batches in shared memory (:func:`share_batch`), then its tiling facts.
    It imports no torch: decoding threads are libvips' and OpenCV's, and the encoder runs elsewhere."""
    while True:
        item = jobs.get()
        if item is None:
            return
        key, job = item
        slide = SlideBatches(job, cfg)
        try:
            for index, batch in enumerate(slide):
                batches.put(("batch", key, index, share_batch(batch)))
        except ConfigError as err:
            batches.put(("fatal", key, str(err)))
            continue
        except Exception as err:  # one bad slide: its failure row, and the next slide
            batches.put(("failed", key, failure_message(job, err), unexpected_error(err)))
            continue
        batches.put(("end", key, slide.result))
