"""Fused mode: stream one raw slide through the stage-01 tiler straight into the encoder (no tiles written).

:class:`~ubc_ocean.inference.decoding.SlideBatches` is the CPU half (decode, tile, make each tile look like a
stored training tile, batch); :func:`embed_slide_streaming` runs both halves in one process. The pipelined
version, with decoder processes feeding the GPUs, is :mod:`ubc_ocean.inference.pipeline`; both use
:class:`~ubc_ocean.inference.decoding.SlideBatches`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ubc_ocean.encoders.registry import Encoder
from ubc_ocean.features.embed import embed_batches, inference_options
from ubc_ocean.inference.decoding import SlideBatches, SlideJob, TiledSlide
from ubc_ocean.sources import SlideSpec
from ubc_ocean.stain_normalisation import StainReference


def embed_slide_streaming(
    spec: SlideSpec | SlideJob, cfg: Mapping, encoder: Encoder, device: torch.device,
    stain: StainReference | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(features [N, D] float32, coords [N, 2], slide info)`` for one raw slide, in one pass, in this
    process.

    Uses the very tiler of stage 01 (same tissue mask, plan, resizing and blur filter), the same tile
    encoding and the same stain normalisation (to ``stain``, with ``features.stain_normalisation`` on), so
    its features equal those of stage 01 + stage 03.
    """
    job = spec if isinstance(spec, SlideJob) else SlideJob(spec)
    batches = SlideBatches(job, cfg)
    chunks = list(embed_batches(encoder, batches, device, **inference_options(cfg["features"], stain)))
    return assemble(chunks, batches.result, encoder.out_dim)


def assemble(chunks: list[np.ndarray], tiled: TiledSlide, width: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """One slide's features (the kept tiles' rows of the batches' features, in order), coords and facts."""
    features = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
    if len(tiled.keep) != len(features):
        raise RuntimeError(f"{len(features)} features for {len(tiled.keep)} tiles")
    return features[tiled.keep], tiled.coords, tiled.info
