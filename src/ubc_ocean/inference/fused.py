"""Fused mode: stream one raw slide through the stage-01 tiler straight into the encoder (no tiles written).

:class:`SlideBatches` is the CPU half (decode, tile, make each tile look like a stored training tile,
batch); :func:`embed_slide_streaming` runs both halves in one process. The pipelined version, with decoder
processes feeding the GPUs, is :mod:`ubc_ocean.inference.pipeline`; both use :class:`SlideBatches`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.encoders.registry import Encoder
from ubc_ocean.features.embed import chunked, embed_batches, inference_options
from ubc_ocean.slides import SlideError
from ubc_ocean.sources import SlideSpec
from ubc_ocean.tile_store import round_trip
from ubc_ocean.tiling.tiler import SlideTiler, TileRecord


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


def embed_slide_streaming(
    spec: SlideSpec | SlideJob, cfg: Mapping, encoder: Encoder, device: torch.device
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(features [N, D] float32, coords [N, 2], slide info)`` for one raw slide, in one pass, in this
    process.

    Uses the very tiler of stage 01 (same tissue mask, plan, resizing and blur filter) and the same tile
    encoding, so its features equal those of stage 01 + stage 03.
    """
    job = spec if isinstance(spec, SlideJob) else SlideJob(spec)
    batches = SlideBatches(job, cfg)
    chunks = list(embed_batches(encoder, batches, device, **inference_options(cfg["features"])))
    return assemble(chunks, batches.result, encoder.out_dim)


def assemble(chunks: list[np.ndarray], tiled: TiledSlide, width: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """One slide's features (the kept tiles' rows of the batches' features, in order), coords and facts."""
    features = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
    if len(tiled.keep) != len(features):
        raise RuntimeError(f"{len(features)} features for {len(tiled.keep)} tiles")
    return features[tiled.keep], tiled.coords, tiled.info
