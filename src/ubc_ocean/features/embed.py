"""Batched inference of an encoder over uint8 tile batches, on CPU or CUDA (autocast, channels_last)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from ubc_ocean.config import ConfigError
from ubc_ocean.device import autocast, autocast_dtype
from ubc_ocean.encoders.registry import Encoder, create_encoder
from ubc_ocean.features.augment import stain_augmenter, tta_views
from ubc_ocean.parallel import usable_cores
from ubc_ocean.stain_normalisation import StainNormaliser, StainReference

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
    normalise: Callable[[np.ndarray], np.ndarray] | None = None,
    stain_tta: bool = False,
) -> Iterator[np.ndarray]:
    """Yield float32 features [B, D] for each uint8 batch [B, H, W, 3].

    ``normalise`` maps the uint8 batch onto a stain reference first (with ``stain_tta``, the features of
    the raw and the normalised batch are averaged); ``augment`` then transforms it (stain jitter); ``tta``
    averages the features of flipped / rotated views of each. Under fp16 autocast, a view whose features
    overflow (inf/NaN: large ViTs' activations exceed fp16's range) is computed again in fp32.

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
            total, count = None, 0
            for colours in colour_views(batch, normalise, stain_tta):
                if augment is not None:
                    colours = augment(np.asarray(colours))
                tiles = torch.as_tensor(colours)
                if device.type == "cuda":
                    tiles = tiles.pin_memory().to(device, non_blocking=True)
                x = encoder.preprocess(tiles)
                n = len(x)
                if bucket:
                    x = padded_to(x, bucket_size(n, full_batch))
                for view in tta_views(x, tta):
                    if device.type == "cuda":
                        view = view.contiguous(memory_format=torch.channels_last)
                    with autocast(device, precision):
                        features = encoder.model(view).float()
                    if half and not bool(torch.isfinite(features).all()):
                        log.warning("%s: fp16 features overflowed; this batch again in fp32", encoder.name)
                        features = encoder.model(view).float()
                    total = features if total is None else total + features
                    count += 1
            yield (total[:n] / count).cpu().numpy()


def colour_views(batch: np.ndarray | torch.Tensor, normalise: Callable[[np.ndarray], np.ndarray] | None,
                 stain_tta: bool) -> list[np.ndarray | torch.Tensor]:
    """The colour views of a uint8 batch whose features are averaged: itself; its stain-normalised copy
    (``normalise``); or both (``stain_tta``)."""
    if normalise is None:
        return [batch]
    normalised = normalise(np.asarray(batch))
    return [batch, normalised] if stain_tta else [normalised]


def inference_options(features_cfg: Mapping, stain: StainReference | None = None) -> dict:
    """``embed_batches`` keyword arguments for test images (stage 05, fused mode): precision, TTA, the
    full batch size and, with ``features.stain_normalisation`` on, the normalisation to ``stain`` (the
    run's reference: a ``ConfigError`` without one, or with one of another method; ``features.stain_tta``);
    never a stain jitter, whatever ``features.stain_augmentation`` says (it augments training tiles only)."""
    method = str(features_cfg["stain_normalisation"])
    options = {"precision": features_cfg["precision"], "tta": features_cfg["tta"],
               "full_batch": int(features_cfg["batch_size"])}
    if method == "none":
        return options
    if stain is None or stain.method != method:
        found = "none was given" if stain is None else f"the reference is {stain.method}'s"
        raise ConfigError(f"features.stain_normalisation={method} needs a {method} stain reference; {found}")
    return {**options, "normalise": StainNormaliser(stain), "stain_tta": bool(features_cfg["stain_tta"])}


def embedding_options(features_cfg: Mapping, slide_id: str, stain: StainReference | None = None) -> dict:
    """``embed_batches`` keyword arguments for training tiles (stage 03): :func:`inference_options` (the
    normalisation to ``stain`` included) plus the ``features.stain_augmentation`` jitter, seeded per slide,
    which applies after the normalisation."""
    strength = float(features_cfg["stain_augmentation"])
    return {**inference_options(features_cfg, stain),
            "augment": stain_augmenter(slide_id, strength) if strength > 0 else None}
