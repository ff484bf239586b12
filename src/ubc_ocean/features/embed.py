"""Batched inference of an encoder over uint8 tile batches, on CPU or CUDA (autocast, channels_last)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from ubc_ocean.device import autocast, autocast_dtype
from ubc_ocean.encoders.registry import Encoder, create_encoder
from ubc_ocean.features.augment import stain_augmenter, tta_views
from ubc_ocean.parallel import usable_cores

log = logging.getLogger(__name__)
_ENCODERS: dict[tuple, Encoder] = {}


def set_cpu_threads(cfg: Mapping) -> None:
    """``features.cpu_threads`` (0: every core this process may use) shared among the ``runtime.workers``
    processes."""
    threads = int(cfg["features"]["cpu_threads"]) or usable_cores()
    torch.set_num_threads(max(1, threads // int(cfg["runtime"]["workers"])))


def encoder_from_config(cfg: Mapping) -> Encoder:
    """The configured encoder, built once per process (which also sets its CPU thread count)."""
    set_cpu_threads(cfg)
    features = cfg["features"]
    # adapted batch-norm statistics are loaded into the cached encoder: never shared with unadapted configs
    key = (features["encoder"], features["weights"], features["input_size"], bool(features["bn_adaptation"]))
    if key not in _ENCODERS:
        _ENCODERS[key] = create_encoder(
            features["encoder"], weights=features["weights"], input_size=features["input_size"]
        )
    return _ENCODERS[key]


def prepare_encoder(encoder: Encoder, device: torch.device) -> Encoder:
    """Move the encoder to ``device`` in eval mode (channels_last on CUDA)."""
    encoder.model.to(device).eval()
    if device.type == "cuda":
        encoder.model.to(memory_format=torch.channels_last)
    return encoder


def bucket_size(n: int, full_batch: int | None = None) -> int:
    """The batch size ``n`` tiles are padded to on CUDA: the next power of two, but never past the size of
    a full batch (``full_batch``, whose batches stay as they are whatever it is)."""
    size = 1 << max(0, n - 1).bit_length()
    return size if full_batch is None or n > full_batch else min(size, full_batch)


def padded_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` [n, ...] with ``size - n`` zero rows appended (the model's rows are independent in eval mode)."""
    if len(x) >= size:
        return x
    return torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])


def embed_batches(
    encoder: Encoder,
    batches: Iterable[np.ndarray | torch.Tensor],
    device: torch.device,
    precision: str = "auto",
    tta: str = "none",
    augment: Callable[[np.ndarray], np.ndarray] | None = None,
    bucket: bool | None = None,
    full_batch: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield float32 features [B, D] for each uint8 batch [B, H, W, 3].

    ``augment`` transforms the uint8 batch first (stain jitter); ``tta`` averages the features of
    flipped / rotated views. Under fp16 autocast, a view whose features overflow (inf/NaN: large ViTs'
    activations exceed fp16's range) is computed again in fp32.

    ``bucket`` (default: on CUDA) pads each batch to :func:`bucket_size` (capped at ``full_batch``, the
    configured batch size) and drops the padding's features:
    cuDNN plans its convolutions once per input shape, and a slide's last batch has a size of its own
    (measured on an H100: 1.8 s for the first batch of a new size through efficientnet_lite0, against 6 ms
    per batch of 64 after), so the encoder sees a handful of sizes per run instead of one per slide.
    """
    half = autocast_dtype(device, precision) == torch.float16
    bucket = device.type == "cuda" if bucket is None else bucket
    with torch.inference_mode():
        for batch in batches:
            if augment is not None:
                batch = augment(np.asarray(batch))
            tiles = torch.as_tensor(batch)
            if device.type == "cuda":
                tiles = tiles.pin_memory().to(device, non_blocking=True)
            x = encoder.preprocess(tiles)
            n = len(x)
            if bucket:
                x = padded_to(x, bucket_size(n, full_batch))
            views = tta_views(x, tta)
            total = None
            for view in views:
                if device.type == "cuda":
                    view = view.contiguous(memory_format=torch.channels_last)
                with autocast(device, precision):
                    features = encoder.model(view).float()
                if half and not bool(torch.isfinite(features).all()):
                    log.warning("%s: fp16 features overflowed; this batch again in fp32", encoder.name)
                    features = encoder.model(view).float()
                total = features if total is None else total + features
            yield (total[:n] / len(views)).cpu().numpy()


def inference_options(features_cfg: Mapping) -> dict:
    """``embed_batches`` keyword arguments for test images (stage 05, fused mode): precision, TTA and the
    full batch size, and never a stain jitter, whatever ``features.stain_augmentation`` says (it augments
    training tiles only)."""
    return {"precision": features_cfg["precision"], "tta": features_cfg["tta"],
            "full_batch": int(features_cfg["batch_size"])}


def embedding_options(features_cfg: Mapping, slide_id: str) -> dict:
    """``embed_batches`` keyword arguments for training tiles (stage 03): :func:`inference_options` plus the
    ``features.stain_augmentation`` jitter, seeded per slide."""
    strength = float(features_cfg["stain_augmentation"])
    return {**inference_options(features_cfg),
            "augment": stain_augmenter(slide_id, strength) if strength > 0 else None}
