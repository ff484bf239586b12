"""Fused mode: stream one raw slide through the stage-01 tiler straight into the encoder (no tiles written)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from ubc_ocean.features.embed import chunked, embed_batches, embedding_options
from ubc_ocean.features.encoders import Encoder
from ubc_ocean.slides import SlideError
from ubc_ocean.sources import SlideSpec
from ubc_ocean.tiling.settings import TilingSettings
from ubc_ocean.tiling.tiler import SlideTiler, TileRecord


def embed_slide_streaming(
    spec: SlideSpec, cfg: Mapping, encoder: Encoder, device: torch.device
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(features [N, D] float32, coords [N, 2], slide info)`` for one raw slide, in one pass.

    Uses the very tiler of stage 01 (same tissue mask, plan, resizing and blur filter), so its features
    equal those of stage 01 + stage 03 up to the tile files' JPEG compression.
    """
    records: list[TileRecord] = []
    with SlideTiler(spec, TilingSettings.from_config(cfg)) as tiler:

        def tiles() -> Iterator[np.ndarray]:
            for record, rgb in tiler:
                records.append(record)
                yield rgb

        batches = (np.stack(chunk) for chunk in chunked(tiles(), int(cfg["features"]["batch_size"])))
        chunks = list(embed_batches(encoder, batches, device, **embedding_options(cfg["features"], spec.slide_id)))
        kept = tiler.finish(records)
    features = np.concatenate(chunks) if chunks else np.zeros((0, encoder.out_dim), np.float32)
    kept_boxes = {record.box for record in kept}
    keep = np.array([record.box in kept_boxes for record in records], dtype=bool)
    features = features[keep] if len(keep) else features
    if not kept:
        raise SlideError(tiler.info.no_tiles_message())
    coords = np.array([[r.x, r.y] for r in kept], dtype=np.int64).reshape(-1, 2)
    return features, coords, tiler.info.to_dict()
