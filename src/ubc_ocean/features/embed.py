"""Batched inference of an encoder over uint8 tile batches, on CPU or CUDA (autocast, channels_last)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ubc_ocean.device import autocast
from ubc_ocean.features.encoders import Encoder


def prepare_encoder(encoder: Encoder, device: torch.device) -> Encoder:
    """Move the encoder to ``device`` in eval mode (channels_last on CUDA)."""
    encoder.model.to(device).eval()
    if device.type == "cuda":
        encoder.model.to(memory_format=torch.channels_last)
    return encoder


def embed_batches(
    encoder: Encoder,
    batches: Iterable[np.ndarray | torch.Tensor],
    device: torch.device,
    precision: str = "auto",
) -> Iterator[np.ndarray]:
    """Yield float32 features [B, D] for each uint8 batch [B, H, W, 3]."""
    with torch.inference_mode():
        for batch in batches:
            tiles = torch.as_tensor(batch)
            if device.type == "cuda":
                tiles = tiles.pin_memory().to(device, non_blocking=True)
            x = encoder.preprocess(tiles)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                features = encoder.model(x)
            yield features.float().cpu().numpy()


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
