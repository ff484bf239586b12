"""Stage 03's stain reference (``features.stain_normalisation``): fitted once, before any slide is embedded, on
a seeded sample of the competition's training tiles, and written beside the embeddings, where every worker
process (and stage 04) reads it. The stage names the files (``layout``); this module only reads and fits."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ubc_ocean import tile_store
from ubc_ocean.config import ConfigError
from ubc_ocean.stain_normalisation import StainError, StainReference

log = logging.getLogger(__name__)


def reference_sample(cfg: Mapping) -> dict:
    """How the reference tiles are drawn (recorded with the reference: another draw fits another one)."""
    return {"seed": int(cfg["seed"]), "requested_tiles": int(cfg["features"]["stain_reference_tiles"])}


def fit_reference(cfg: Mapping, folders: Mapping[str, Path]) -> StainReference:
    """The reference of ``features.stain_normalisation`` fitted on :func:`~ubc_ocean.tile_store.sample_tiles` of the
    training slides' tile ``folders`` (unreadable tiles skipped); a ``ConfigError`` when they hold too
    little stain to fit."""
    tiles, names = [], []
    sample = reference_sample(cfg)
    for name, path in tile_store.sample_tiles(folders, sample["requested_tiles"], sample["seed"]):
        try:
            tiles.append(tile_store.read_tile(path))
        except OSError as err:
            log.warning("stain reference: tile %s skipped (%s)", path, err)
            continue
        names.append(name)
    method = str(cfg["features"]["stain_normalisation"])
    try:
        return StainReference.fit(method, tiles, names, black_value=int(cfg["tiling"]["black_value"]), sample=sample)
    except StainError as err:
        raise ConfigError(f"features.stain_normalisation={method}: {err}; draw more tiles "
                          "(features.stain_reference_tiles) or set features.stain_normalisation=none") from None


def prepare_reference(cfg: Mapping, folders: Mapping[str, Path], path: Path) -> StainReference | None:
    """The stain reference at ``path`` (None with normalisation off): the one already there when it was drawn
    as the config draws it (a resumed run), else fitted now on the training slides' tile ``folders`` and
    written (slides embedded with an older one are embedded again: their h5 records its sha256)."""
    method = str(cfg["features"]["stain_normalisation"])
    if method == "none":
        return None
    try:
        reference = StainReference.load(path)
    except FileNotFoundError:
        reference = None
    except (OSError, ValueError) as err:
        log.warning("stain reference %s is unusable (%s): fitting it again", path, err)
        reference = None
    if reference is not None and reference.method == method and reference.sample == reference_sample(cfg):
        log.info("stain reference: %s (%s, %d tiles)", path, method, len(reference.tiles))
        return reference
    reference = fit_reference(cfg, folders)
    reference.save(path)
    log.info("stain reference fitted (%s) on %d training tiles -> %s (sha256 %s)", method, len(reference.tiles),
             path, reference.sha256[:12])
    return reference


def load_reference(cfg: Mapping, path: Path) -> StainReference | None:
    """The reference :func:`prepare_reference` wrote at ``path`` (None with normalisation off), as a worker
    process reads it."""
    if cfg["features"]["stain_normalisation"] == "none":
        return None
    return StainReference.load(path)
