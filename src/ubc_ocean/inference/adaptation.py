"""``features.bn_adaptation`` in stage 05: the encoder's batch-norm statistics re-estimated over the test set's
own tiles (a sample decoded once, spread over the images), saved beside the test embeddings so a rerun on the same
images reuses them, and loaded into the encoder before any image is embedded."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ubc_ocean.device import resolve_device
from ubc_ocean.features.bn_adaptation import (
    STATISTICS_FILE,
    batchnorm_state,
    load_batchnorm_state,
    load_statistics,
    reestimate_batchnorm,
    save_statistics,
    statistics_metadata,
)
from ubc_ocean.features.embed import encoder_from_config, inference_options, prepare_encoder
from ubc_ocean.inference.decoding import SlideBatches, SlideJob
from ubc_ocean.parallel import shard_output
from ubc_ocean.sources import SlideSpec
from ubc_ocean.stain_normalisation import StainReference

log = logging.getLogger(__name__)


def images_digest(specs: list[SlideSpec]) -> str:
    """sha256 of the sorted slide ids: which test images a set of statistics was estimated over."""
    return hashlib.sha256("\n".join(sorted(spec.slide_id for spec in specs)).encode()).hexdigest()


def sampled_test_tiles(specs: list[SlideSpec], cfg: Mapping, total: int) -> Iterator[np.ndarray]:
    """uint8 batches of about ``total`` tiles of the test images, up to ``ceil(total / images)`` from each, the
    images taken in a seeded random order (the config's ``seed``) until ``total`` are collected. Each tile is made as
    stage 05 makes it (the fused tiler); an image that cannot be read is skipped."""
    if not specs:
        return
    order = np.random.default_rng(int(cfg["seed"])).permutation(len(specs))
    per_image = max(2, math.ceil(total / len(specs)))
    batch_size = int(cfg["features"]["batch_size"])
    pending: list[np.ndarray] = []
    collected = 0
    for index in order:
        spec = specs[int(index)]
        batches = SlideBatches(SlideJob(spec, max_tiles=per_image), cfg)
        try:
            chunks = list(batches)
        except Exception as err:  # a bad image is stage 05's failure to report, not the sample's
            log.debug("%s left out of the batch-norm statistics: %s", spec.slide_id, err)
            continue
        if not chunks:
            continue
        tiles = np.concatenate(chunks)[batches.result.keep][: total - collected]
        pending.append(tiles)
        collected += len(tiles)
        while sum(len(chunk) for chunk in pending) >= batch_size:
            joined = np.concatenate(pending)
            yield joined[:batch_size]
            pending = [joined[batch_size:]]
        if collected >= total:
            break
    rest = np.concatenate(pending) if pending else np.zeros((0,))
    if len(rest):
        yield rest


def adapt_to_test_images(cfg: Mapping, specs: list[SlideSpec], test_root: Path,
                         stain: StainReference | None = None) -> dict:
    """With ``features.bn_adaptation``, load into the configured encoder the batch-norm statistics of these
    test images' tiles (normalised to ``stain``, the run's reference, when the config normalises; estimated
    once and saved in ``test_root``, one file per shard; reused while the images are the same); returns the
    attributes each test h5 then records (empty without adaptation)."""
    if not cfg["features"]["bn_adaptation"]:
        return {}
    encoder = encoder_from_config(cfg)
    path = shard_output(test_root, STATISTICS_FILE, cfg["runtime"]["shard"])
    digest = images_digest(specs)
    if statistics_metadata(path).get("images_sha256") == digest:
        state = load_statistics(path)
        load_batchnorm_state(encoder.model, state)
        log.info("batch-norm statistics of these %d test images reused from %s", len(specs), path)
    else:
        device = resolve_device(cfg["runtime"]["device"])
        prepare_encoder(encoder, device)
        total = int(cfg["features"]["bn_adaptation_tiles"])
        options = inference_options(cfg["features"], stain)
        seen = reestimate_batchnorm(encoder, sampled_test_tiles(specs, cfg, total), device, options)
        if seen == 0:
            raise RuntimeError("features.bn_adaptation: no test tile could be read to estimate the statistics")
        state = batchnorm_state(encoder.model)
        save_statistics(path, state, seen, images_sha256=digest)
        log.info("batch-norm statistics re-estimated over %d tiles of %d test images -> %s", seen, len(specs), path)
    return {"bn_statistics_sha256": statistics_metadata(path)["sha256"]}
