"""Bags of instance embeddings held in memory (fp16) and the per-step sampling used in training."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ubc_ocean import embedding_cache

log = logging.getLogger(__name__)


class BagError(ValueError):
    """A bag that cannot be used (empty, non-finite, wrong width)."""


def check_bag(features: np.ndarray, slide_id: str, in_dim: int | None = None) -> None:
    """Refuse empty bags, NaN/inf features and a feature width other than ``in_dim``."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise BagError(f"{slide_id}: empty bag (shape {features.shape})")
    if in_dim is not None and features.shape[1] != in_dim:
        raise BagError(f"{slide_id}: feature width {features.shape[1]}, expected {in_dim} (the encoder's)")
    if not np.isfinite(features).all():
        raise BagError(f"{slide_id}: bag holds NaN or inf features")


def load_bags(paths: dict[str, Path], in_dim: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read each slide's h5 features into fp16 tensors; returns ``(bags, problems)`` (slide -> message).

    ``in_dim`` is the width the encoder makes (``encoders.registry.encoder_out_dim``), never taken from the
    data: a bag of another width is that slide's problem, whichever order the files come in."""
    bags: dict[str, torch.Tensor] = {}
    problems: dict[str, str] = {}
    for slide_id, path in paths.items():
        try:
            if not embedding_cache.is_complete(path):
                raise BagError(f"{slide_id}: no embeddings file {path}")
            features, _, _ = embedding_cache.read_embeddings(path)
            check_bag(features.astype(np.float32), slide_id, in_dim)
        except (BagError, OSError) as err:
            problems[slide_id] = str(err)
            continue
        bags[slide_id] = torch.from_numpy(features.astype(np.float16))
    return bags, problems


def sample_instances(bag: torch.Tensor, max_instances: int, generator: torch.Generator) -> torch.Tensor:
    """The bag's rows in a fresh random order, at most ``max_instances`` of them (``0``: all).

    A bag is a set: the order of its tiles is an artefact of tiling. Heads that read the order (TransMIL's
    position encoding and value convolution) would otherwise learn each training bag's fixed sequence;
    a new order at every step leaves them only what a set holds, and changes nothing for pooling heads."""
    order = torch.randperm(bag.shape[0], generator=generator)
    return bag[order if max_instances <= 0 else order[:max_instances]]


def drop_features(bag: torch.Tensor, p: float, rng: np.random.Generator) -> torch.Tensor:
    """Inverted dropout of single feature values: each kept with probability ``1 - p`` and scaled by
    ``1 / (1 - p)``. On CPU the mask comes from NumPy's PCG64 (``rng``), several times faster there than
    torch's Bernoulli sampling, which otherwise costs as much as a training step's matrix products; on
    other devices it is ``F.dropout``."""
    if p <= 0:
        return bag
    if p >= 1:
        return torch.zeros_like(bag)
    if bag.device.type != "cpu":
        return torch.nn.functional.dropout(bag, p=p, training=True)
    keep = torch.from_numpy(rng.random(tuple(bag.shape), dtype=np.float32) >= p)
    return bag * keep * (1.0 / (1.0 - p))


def load_tumour_fractions(paths: dict[str, Path], bags: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The tile tumour fractions of the slides in ``bags`` whose h5 holds any (a supplemental mask; stage 03
    copies them from stage 01's tile index), each aligned with its bag's rows. A slide whose fractions do not
    match its bag's length is left out with a warning."""
    fractions = {}
    for slide_id in bags:
        values = embedding_cache.read_tumour_fraction(paths[slide_id])
        if values is None or not np.isfinite(values).any():
            continue
        if len(values) != bags[slide_id].shape[0]:
            log.warning("%s: %d tumour fractions for %d tiles in %s; its mask is not used", slide_id, len(values),
                        bags[slide_id].shape[0], paths[slide_id])
            continue
        fractions[slide_id] = values.astype(np.float32)
    return fractions
