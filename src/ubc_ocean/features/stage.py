"""Stage 03: embed each manifest slide's tiles into a per-slide h5 file, resumably.

With ``features.stain_normalisation`` on, a stain reference is fitted first on a seeded sample of training
tiles (:mod:`ubc_ocean.features.stain`) and written beside the embeddings (``stain_reference.json``, reused
when present); every tile is normalised to it before the encoder (and before any stain jitter), and each h5
records its sha256 (a slide embedded with another reference is embedded again)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from ubc_ocean import embedding_cache, layout, tile_store
from ubc_ocean.config import save_config
from ubc_ocean.device import resolve_device
from ubc_ocean.encoders.registry import Encoder
from ubc_ocean.features.bn_adaptation import (
    STATISTICS_FILE,
    batchnorm_state,
    load_batchnorm_state,
    load_statistics,
    reestimate_batchnorm,
    save_statistics,
    statistics_attrs,
)
from ubc_ocean.features.embed import (
    embed_batches,
    embedding_options,
    encoder_from_config,
    inference_options,
    prepare_encoder,
)
from ubc_ocean.features.stain import load_reference, prepare_reference
from ubc_ocean.io_utils import FailureLog, MissingInput, clean_stale_temporaries
from ubc_ocean.parallel import TaskResult, run_tasks, select_shard, shard_output
from ubc_ocean.sources import TRAIN
from ubc_ocean.stain_normalisation import StainReference, reference_attrs

log = logging.getLogger(__name__)
STAGE = "03_cache_embeddings"


class TileFiles(Dataset):
    """Decodes tile files; an unreadable tile yields ``ok=False`` instead of stopping the slide."""

    def __init__(self, paths: list[Path], tile_size: int):
        self.paths = paths
        self.tile_size = tile_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, bool]:
        try:
            rgb = tile_store.read_tile(self.paths[index])
        except OSError:
            return np.zeros((self.tile_size, self.tile_size, 3), np.uint8), False
        if rgb.shape[:2] != (self.tile_size, self.tile_size):
            return np.zeros((self.tile_size, self.tile_size, 3), np.uint8), False
        return rgb, True


def embed_tile_folder(folder: Path, encoder: Encoder, cfg: Mapping, device: torch.device,
                      index: pd.DataFrame | None = None,
                      stain: StainReference | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features and coords of every readable tile in a slide folder, plus the names of unreadable ones
    (``index``: the folder's tile index, when the caller has read it already; ``stain``: the reference
    tiles are normalised to, with ``features.stain_normalisation`` on)."""
    features_cfg = cfg["features"]
    index = tile_store.read_index(folder) if index is None else index
    dataset = TileFiles([folder / name for name in index["file"]], int(cfg["tiling"]["tile_size"]))
    loader = DataLoader(dataset, batch_size=int(features_cfg["batch_size"]),
                        num_workers=int(features_cfg["num_workers"]), pin_memory=device.type == "cuda")
    oks: list[np.ndarray] = []

    def tiles_only() -> Iterator[torch.Tensor]:
        for tiles, ok in loader:
            oks.append(ok.numpy())
            yield tiles
    options = embedding_options(features_cfg, f"{folder.parent.name}/{folder.name}", stain)  # the slide id
    chunks = list(embed_batches(encoder, tiles_only(), device, **options))
    ok = np.concatenate(oks) if oks else np.zeros(0, bool)
    features = np.concatenate(chunks)[ok] if chunks else np.zeros((0, encoder.out_dim), np.float32)
    coords = index[["x", "y"]].to_numpy()[ok]
    bad = index["file"][~ok].tolist()
    return features, coords, bad


def _tumour_fractions(index: pd.DataFrame, bad: list[str]) -> np.ndarray | None:
    """The embedded tiles' tumour fractions (index order, unreadable tiles left out, as the features), or
    None when the slide has no mask (no finite fraction): its h5 is then as it was before masks."""
    values = index.loc[~index["file"].isin(bad), tile_store.TUMOUR_FRACTION].to_numpy(np.float32)
    return values if np.isfinite(values).any() else None


def sampled_training_tiles(cfg: Mapping, rows: list[Mapping], total: int) -> Iterator[np.ndarray]:
    """uint8 batches of about ``total`` stored tiles spread evenly over the slides of ``rows`` (seeded by
    the config's ``seed``; slides without a complete tile folder are left out), for the batch-norm statistics."""
    folders = {row["slide_id"]: layout.slide_tiles_dir(cfg, row["source"], row["image_id"]) for row in rows}
    paths = [path for _, path in tile_store.sample_tiles(folders, total, int(cfg["seed"]))]
    batch_size = int(cfg["features"]["batch_size"])
    for start in range(0, len(paths), batch_size):
        tiles = []
        for path in paths[start:start + batch_size]:
            try:
                tiles.append(tile_store.read_tile(path))
            except OSError:
                log.debug("%s: unreadable tile left out of the batch-norm statistics", path)
        if tiles:
            yield np.stack(tiles)


def adapt_to_training_tiles(cfg: Mapping, rows: list[Mapping], root: Path) -> Path:
    """``features.bn_adaptation``: the encoder's batch-norm statistics re-estimated over training tiles, written
    once to ``{root}/bn_statistics.safetensors`` (kept when there: every worker, shard and rerun uses the
    same); returns its path."""
    path = root / STATISTICS_FILE
    if path.exists():
        return path
    encoder = encoder_from_config(cfg)
    device = resolve_device(cfg["runtime"]["device"])
    prepare_encoder(encoder, device)
    total = int(cfg["features"]["bn_adaptation_tiles"])
    stain = load_reference(cfg, layout.stain_reference_path(root))  # the tiles as the encoder will see them
    options = inference_options(cfg["features"], stain)  # the colour views, without stage 03's jitter
    seen = reestimate_batchnorm(encoder, sampled_training_tiles(cfg, rows, total), device, options)
    if seen == 0:
        raise RuntimeError("features.bn_adaptation: no training tile could be read to estimate the statistics")
    digest = save_statistics(path, batchnorm_state(encoder.model), seen)
    log.info("batch-norm statistics re-estimated over %d training tiles (sha256 %s) -> %s", seen, digest[:12], path)
    return path


def adapted_encoder(cfg: Mapping, root: Path) -> Encoder:
    """The configured encoder, with the training tiles' batch-norm statistics loaded when
    ``features.bn_adaptation``."""
    encoder = encoder_from_config(cfg)
    if cfg["features"]["bn_adaptation"]:
        load_batchnorm_state(encoder.model, load_statistics(root / STATISTICS_FILE))
    return encoder


def embed_slide(row: Mapping, cfg: Mapping, root: Path) -> TaskResult:
    """Embed one slide's tiles (skipped when its h5 was made from the tile folder as it is now)."""
    slide_id = row["slide_id"]
    out = layout.embedding_path(root, row["source"], row["image_id"])
    folder = layout.slide_tiles_dir(cfg, row["source"], row["image_id"])
    if not tile_store.is_complete(folder):
        if embedding_cache.is_complete(out):  # tiles deleted after embedding (to save disk): the embeddings stand
            return TaskResult(slide_id, "skipped")
        return TaskResult(slide_id, "failed", f"no tile folder {folder}")
    tiles_fingerprint = tile_store.fingerprint(folder)
    stain = load_reference(cfg, layout.stain_reference_path(root))
    made_with = {**reference_attrs(stain), **statistics_attrs(cfg, root / STATISTICS_FILE)}
    if embedding_cache.is_current(out, tiles_fingerprint, made_with):
        return TaskResult(slide_id, "skipped")
    encoder = adapted_encoder(cfg, root)
    device = resolve_device(cfg["runtime"]["device"])
    prepare_encoder(encoder, device)
    index = tile_store.read_index(folder)
    features, coords, bad = embed_tile_folder(folder, encoder, cfg, device, index, stain)
    if len(features) == 0:
        return TaskResult(slide_id, "failed", "zero readable tiles")
    if not np.isfinite(features).all():
        return TaskResult(slide_id, "failed", "encoder produced NaN/inf features")
    attrs = layout.embedding_attrs(cfg, encoder.name, encoder.weights_id, encoder.input_size, slide_id,
                                   tiles_fingerprint=tiles_fingerprint, **made_with)
    embedding_cache.write_embeddings(out, features, coords, attrs, tumour_fraction=_tumour_fractions(index, bad))
    message = f"{len(bad)} unreadable tiles skipped: {', '.join(bad[:5])}" if bad else ""
    return TaskResult(slide_id, "done", message, count=len(features))


def prepare_stain_reference(cfg: Mapping, manifest: pd.DataFrame, root: Path) -> StainReference | None:
    """With ``features.stain_normalisation`` on, the stain reference beside the embeddings under ``root``,
    fitted on the manifest's competition training slides' tiles unless already there
    (:func:`~ubc_ocean.features.stain.prepare_reference`); a ``MissingInput`` when they have no tiles."""
    if cfg["features"]["stain_normalisation"] == "none":
        return None
    train = manifest[manifest["source"] == TRAIN]
    folders = {row.slide_id: layout.slide_tiles_dir(cfg, row.source, row.image_id) for row in train.itertuples()}
    if not any(tile_store.is_complete(folder) for folder in folders.values()):
        raise MissingInput(layout.tiles_root(cfg) / TRAIN, layout.run_stage_first("01"),
                           problem="holds no training slide's tiles to fit the stain reference on")
    return prepare_reference(cfg, folders, layout.stain_reference_path(root))


def run(cfg: Mapping) -> Path:
    """Embed every manifest slide (this shard's share); returns the embeddings folder."""
    layout.require_writable(cfg, "processed")
    manifest = layout.read_manifest(cfg)  # before anything is written: stage 02 may not have run
    root = layout.embeddings_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)
    prepare_stain_reference(cfg, manifest, root)  # before any worker starts: they all read this one
    rows = select_shard(manifest.to_dict("records"), cfg["runtime"]["shard"], key=lambda r: r["slide_id"])
    for source in manifest["source"].unique():
        clean_stale_temporaries(root / source)
    if cfg["features"]["bn_adaptation"]:  # over every training slide, whatever this shard embeds
        adapt_to_training_tiles(cfg, manifest.to_dict("records"), root)
    failures = FailureLog(shard_output(root, "failures.csv", cfg["runtime"]["shard"]), STAGE)
    failures.path.unlink(missing_ok=True)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    task = functools.partial(embed_slide, cfg=cfg, root=root)
    workers = int(cfg["runtime"]["workers"])
    for result in run_tasks(rows, task, workers=workers, desc="embedding", unit_counted="tiles"):
        counts[result.status] += 1
        if result.status == "failed":
            log.error("%s: %s", result.item, result.message)
            failures.record(result.item, result.message)
        elif result.message:
            log.warning("%s: %s", result.item, result.message)
            failures.record(result.item, result.message)
    log.info("stage 03: %d slides embedded, %d skipped, %d failed -> %s",
             counts["done"], counts["skipped"], counts["failed"], root)
    return root
