"""Stage 05's CORAL feature alignment (:mod:`ubc_ocean.mil.alignment`) for the models trained with it.

A model whose completion record names ``feature_alignment`` (stage 04, ``mil.feature_alignment: coral``)
does not predict as the test features arrive: the test tiles' moments are counted as they do (every image of
the run, WSIs and TMAs apart; no label is read), and once every image is embedded each image's features are
read back from its cached h5, mapped onto the training tiles' moments (the model's
``source_statistics.npz``) with the eps, ``by_kind`` and ``min_tiles`` training recorded, and predicted.
Models without alignment stream as before. A sharded run counts only its own shard's images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ubc_ocean import embedding_cache
from ubc_ocean.config import ConfigError
from ubc_ocean.mil.alignment import KINDS, CoralAlignment, CoralSettings, TileStatistics
from ubc_ocean.parallel import parse_shard
from ubc_ocean.sources import TEST

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAlignment:
    """One model's recorded CORAL settings and its training tiles' moments."""

    settings: CoralSettings
    source: TileStatistics


def read_alignment(name: str, record: Mapping, statistics: Path, width: int) -> ModelAlignment | None:
    """Model ``name``'s alignment from its completion ``record`` (``feature_alignment``) and its
    ``statistics`` file; None for a model trained without. Checked before any image is embedded: a record
    that is not CORAL's, or a file that is missing, unreadable or not ``width`` wide, is a ``ConfigError``."""
    entry = record.get("feature_alignment")
    if not entry:
        return None
    try:
        settings = CoralSettings.from_record(entry)
        source = TileStatistics.load(statistics)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model {name!r} was trained with feature alignment, but {err}: retrain it "
                          "(stage 04)") from None
    if source.dim != width:
        raise ConfigError(f"model {name!r}: {statistics} holds {source.dim}-wide statistics, the features are "
                          f"{width} wide: retrain it (stage 04)")
    return ModelAlignment(settings, source)


class DeferredAlignment:
    """The test tiles' moments, counted as features arrive (:meth:`observe`), and the aligned bags of the
    models trained with CORAL once every image is in (:meth:`aligned_bags`)."""

    def __init__(self, models: Mapping[str, ModelAlignment], root: Path, width: int):
        self.models, self.root = dict(models), root
        self.target = TileStatistics(width)
        self.is_tma: dict[str, bool] = {}  # slide id -> kind, for every image counted

    def path(self, slide_id: str) -> Path:
        """The image's cached test features (``test/{image_id}`` -> ``{root}/test/{image_id}.h5``)."""
        return embedding_cache.embedding_path(self.root, TEST, slide_id.split("/", 1)[1])

    def observe(self, bags: Mapping[str, torch.Tensor]) -> None:
        """Count the tiles of newly embedded (or cached) images; their kind comes from their h5's ``is_tma``."""
        for slide_id, bag in bags.items():
            is_tma = bool(embedding_cache.read_attrs(self.path(slide_id)).get("is_tma", False))
            self.target.add(bag.numpy(), is_tma)
            self.is_tma[slide_id] = is_tma

    def alignment(self, name: str) -> CoralAlignment | None:
        """Model ``name``'s maps from the test tiles counted so far, logged; None (its images predicted
        unaligned, with a warning) when either side has fewer than two tiles."""
        model = self.models[name]
        try:
            alignment = model.settings.alignment(model.source, self.target)
        except ValueError as err:
            log.warning("%s: no CORAL alignment (%s); its test images are predicted unaligned", name, err)
            return None
        test, train = self.target.counts(), model.source.counts()
        sides = "; ".join(f"{kind}: training {alignment.sides[kind][0]} -> test {alignment.sides[kind][1]}"
                          for kind in KINDS) if model.settings.by_kind else "pooled"
        log.info("%s: CORAL alignment of %d test tiles (WSI %d, TMA %d) onto %d training tiles (WSI %d, TMA %d), "
                 "eps %g, statistics %s", name, test["all"], test["wsi"], test["tma"], train["all"], train["wsi"],
                 train["tma"], model.settings.eps, sides)
        return alignment

    def aligned_bags(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """``(slide id, {model: its aligned bag})`` for every image counted, in slide id order, each read back
        from its h5 once (an image whose file can no longer be read is left out, with an error logged: those
        models have no prediction for it)."""
        alignments = {name: self.alignment(name) for name in self.models}
        for slide_id in sorted(self.is_tma):
            try:
                features, _, _ = embedding_cache.read_embeddings(self.path(slide_id))
            except (OSError, KeyError) as err:
                log.error("%s: its features could not be read back for %s (%s)", slide_id, ", ".join(alignments), err)
                continue
            yield slide_id, {name: torch.from_numpy(features if alignment is None else
                                                    alignment.apply(features, self.is_tma[slide_id]))
                             for name, alignment in alignments.items()}


def deferred_alignment(models: Mapping[str, ModelAlignment], root: Path, width: int,
                       shard: str | None) -> DeferredAlignment | None:
    """The models whose predictions wait for CORAL (:func:`read_alignment`), or None when there are none. A
    sharded run is warned that its test statistics come from its own shard's images."""
    if not models:
        return None
    if parse_shard(shard)[1] > 1:
        log.warning("stage 05 runs as shard %s: the CORAL test statistics of %s come from this shard's images "
                    "only, not the whole test set", shard, ", ".join(models))
    log.info("%s: trained with CORAL feature alignment; predicted once every test image is embedded",
             ", ".join(models))
    return DeferredAlignment(models, root, width)
