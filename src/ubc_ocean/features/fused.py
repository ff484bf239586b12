"""Fused mode: stream one raw slide through the stage-01 tiler straight into the encoder (no tiles written)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from ubc_ocean.features.embed import chunked, embed_batches, embedding_options
from ubc_ocean.features.encoders import Encoder
from ubc_ocean.slides import SlideError
from ubc_ocean.sources import SlideSpec
from ubc_ocean.tiling.tiler import TileRecord, finalise, iter_tiles, no_tiles_message, prepare_slide


def embed_slide_streaming(
    spec: SlideSpec, cfg: Mapping, encoder: Encoder, device: torch.device
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(features [N, D] float32, coords [N, 2], slide info)`` for one raw slide, in one pass.

    Uses the very tiler of stage 01 (same tissue mask, plan, resizing and blur filter), so its features
    equal those of stage 01 + stage 03 up to the tile files' JPEG compression.
    """
    prepared = prepare_slide(spec, cfg)
    records: list[TileRecord] = []

    def tiles() -> Iterator[np.ndarray]:
        for record, rgb in iter_tiles(prepared):
            records.append(record)
            yield rgb

    try:
        batches = (np.stack(chunk) for chunk in chunked(tiles(), int(cfg["features"]["batch_size"])))
        chunks = list(embed_batches(encoder, batches, device, **embedding_options(cfg["features"], spec.slide_id)))
    finally:
        prepared.close()
    features = np.concatenate(chunks) if chunks else np.zeros((0, encoder.out_dim), np.float32)
    keep = np.array(finalise(prepared, records), dtype=bool)
    records = [record for record, kept in zip(records, keep, strict=True) if kept]
    features = features[keep] if len(keep) else features
    if not records:
        raise SlideError(no_tiles_message(prepared.info))
    coords = np.array([[r.x, r.y] for r in records], dtype=np.int64).reshape(-1, 2)
    return features, coords, {**prepared.info, "n_tiles": len(records)}
