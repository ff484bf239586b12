"""Test-time adaptation of a CNN encoder's batch-norm statistics (AdaBN: Li et al., 2016).

A batch-norm layer normalises with the running mean and variance of the images it was trained on (ImageNet for
the default encoder). Re-estimating those statistics on the tiles of one domain, every learned weight left as it
is, re-centres each channel on that domain: stage 03 re-estimates them over training tiles, stage 05 over the test
set's own tiles (no labels), so each side is normalised by its own statistics (``features.bn_adaptation``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ubc_ocean.config import ConfigError
from ubc_ocean.encoders.registry import Encoder
from ubc_ocean.features.embed import colour_views

log = logging.getLogger(__name__)
STATISTICS_FILE = "bn_statistics.safetensors"
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's batch-norm layers by name (timm's ``BatchNormAct2d`` included: it subclasses them)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats}


def require_batchnorm(encoder: Encoder) -> None:
    """A ``ConfigError`` when the encoder has no batch-norm statistics to adapt (ViTs normalise per token)."""
    if not batchnorm_layers(encoder.model):
        raise ConfigError(f"features.bn_adaptation: encoder {encoder.name!r} has no batch-norm layers (a ViT's "
                          "layer norm has no running statistics); set features.bn_adaptation=false")


def reestimate_batchnorm(encoder: Encoder, batches: Iterable[np.ndarray], device: torch.device,
                         options: Mapping | None = None) -> int:
    """Replace every batch-norm layer's running mean and variance by their averages over ``batches`` (uint8
    tiles [B, H, W, 3]), each in the colour views the embedding gives the encoder (``options``:
    :func:`~ubc_ocean.features.embed.embed_batches`' keywords, whose stain normalisation and stain TTA apply);
    returns the tiles seen. Only those buffers change: weights, biases and every other layer stay as they were,
    and the model is left in eval mode. Without tiles the statistics stay as they were."""
    require_batchnorm(encoder)
    options = options or {}
    layers = batchnorm_layers(encoder.model)
    saved = {name: {key: getattr(layer, key).clone() for key in _BUFFERS} for name, layer in layers.items()}
    momenta = {name: layer.momentum for name, layer in layers.items()}
    model = encoder.model.to(device).eval()
    for layer in layers.values():
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches, each weighted alike
        layer.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if len(batch) < 2:  # one tile has no batch variance to speak of
                    continue
                for view in colour_views(np.asarray(batch), options.get("normalise"), options.get("stain_tta", False)):
                    model(encoder.preprocess(torch.as_tensor(np.asarray(view)).to(device)))
                seen += len(batch)
    finally:
        for name, layer in layers.items():
            layer.momentum = momenta[name]
            layer.eval()
            if seen == 0:
                for key, value in saved[name].items():
                    getattr(layer, key).copy_(value)
    if seen == 0:
        log.warning("batch-norm statistics not re-estimated: no batch of two or more tiles")
    return seen


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every batch-norm layer's running statistics, by ``{layer}.{buffer}`` (CPU copies)."""
    return {f"{name}.{key}": getattr(layer, key).detach().cpu().clone()
            for name, layer in batchnorm_layers(model).items() for key in _BUFFERS}


def load_batchnorm_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Set the running statistics ``state`` holds (from :func:`batchnorm_state` of the same architecture); a
    ``ValueError`` naming the first layer it lacks or that the model lacks."""
    layers = batchnorm_layers(model)
    expected = {f"{name}.{key}" for name in layers for key in _BUFFERS}
    if set(state) != expected:
        missing = sorted(expected - set(state)) or sorted(set(state) - expected)
        raise ValueError(f"batch-norm statistics of another architecture ({missing[0]!r} does not match)")
    for name, layer in layers.items():
        for key in _BUFFERS:
            getattr(layer, key).copy_(state[f"{name}.{key}"].to(getattr(layer, key).device))


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the statistics (names and values): which adaptation made a set of features."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_statistics(path: Path, state: Mapping[str, torch.Tensor], tiles: int, **metadata: str) -> str:
    """Write ``state`` as safetensors (atomically, with the tile count, the digest and ``metadata``);
    returns the digest."""
    from safetensors.torch import save_file

    digest = state_digest(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({key: value.contiguous() for key, value in state.items()}, str(partial),
              metadata={**metadata, "tiles": str(tiles), "sha256": digest})
    partial.replace(path)
    return digest


def load_statistics(path: Path) -> dict[str, torch.Tensor]:
    """The statistics :func:`save_statistics` wrote."""
    from safetensors.torch import load_file

    return load_file(str(path))


def statistics_metadata(path: Path) -> dict[str, str]:
    """The metadata :func:`save_statistics` wrote with the statistics (empty when the file is absent)."""
    from safetensors import safe_open

    if not path.exists():
        return {}
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def statistics_attrs(cfg: Mapping, path: Path) -> dict[str, str]:
    """The h5 attributes that name the batch-norm statistics in ``path`` (their sha256, from the file's
    metadata: the encoder is not built), with ``features.bn_adaptation`` on; empty when off."""
    if not cfg["features"]["bn_adaptation"]:
        return {}
    return {"bn_statistics_sha256": statistics_metadata(path)["sha256"]}
