"""Where every artefact lives, and how a stage reads what the stage before it wrote.

Stages meet only through these files and the typed config: a stage imports this module and library
modules, never another stage. The tree, under ``paths.*`` of the config::

    {interim}/tiles/{tiling key}/                      stage 01
        {source}/{image_id}/  tiles, index.csv, slide.json, qc.png   (tiling/store.py)
        failures*.csv
    {processed}/manifest.csv, folds.csv, failures_02.csv          stage 02
    {processed}/embeddings/{encoder}{variant}__{tiling key}/      stage 03 (training), 05 (test)
        {source}/{image_id}.h5   features [N, D], coords [N, 2], attrs (embedding_attrs)
    {runs}/{experiment}/                                stages 04-06
        {model}/fold{k}_seed{s}.pt, oof.csv, curves.csv, metrics.json, confusion.*, outlier.json,
        {model}/test_predictions*.csv, ensemble.json, failures_04.csv, failures_05*.csv
    {submissions}/{submit.name}.csv                     stage 06
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ubc_ocean.features.augment import variant_name
from ubc_ocean.features.encoders import encoder_cache_name
from ubc_ocean.io_utils import FailureLog
from ubc_ocean.parallel import shard_output
from ubc_ocean.tiling.store import tiling_key

# ------------------------------------------------------------------------------------------- tiles (01)


def tiles_root(cfg: Mapping) -> Path:
    """``{interim}/tiles/{tiling key}``: two tilings never share a folder."""
    return Path(cfg["paths"]["interim"]) / "tiles" / tiling_key(cfg)


def slide_tiles_dir(cfg: Mapping, source: str, image_id: str) -> Path:
    """One slide's tile folder (complete once it exists: it is renamed into place)."""
    return tiles_root(cfg) / source / str(image_id)


def read_tiling_failures(cfg: Mapping) -> pd.DataFrame:
    """Stage 01's failure rows, every shard's file together."""
    return _read_failures(tiles_root(cfg).glob("failures*.csv"))


# ------------------------------------------------------------------------------ manifest and folds (02)


def manifest_path(cfg: Mapping) -> Path:
    return Path(cfg["paths"]["processed"]) / "manifest.csv"


def folds_path(cfg: Mapping) -> Path:
    return Path(cfg["paths"]["processed"]) / "folds.csv"


def read_manifest(cfg: Mapping) -> pd.DataFrame:
    """Stage 02's manifest, refused when it was built for another tiling than the config's."""
    path = manifest_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run stage 02 first")
    manifest = pd.read_csv(path, dtype={"image_id": str})
    stale = set(manifest["tiling_key"]) - {tiling_key(cfg)}
    if stale:
        raise ValueError(f"manifest was built for tiling {sorted(stale)}, config gives {tiling_key(cfg)}: "
                         "re-run stages 01 and 02 with this config")
    return manifest


def read_training_table(cfg: Mapping) -> pd.DataFrame:
    """The manifest joined with its folds: one row per training slide, with ``fold`` (-1: train only)."""
    manifest = read_manifest(cfg)
    path = folds_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run stage 02 first")
    folds = pd.read_csv(path, dtype={"image_id": str})[["slide_id", "fold"]]
    return manifest.merge(folds, on="slide_id", how="inner", validate="one_to_one")


# ------------------------------------------------------------------------------------- embeddings (03, 05)


def embeddings_root(cfg: Mapping) -> Path:
    """``{processed}/embeddings/{encoder}{variant}__{tiling key}``: encoders (with their weights and input
    size), TTA/stain variants and tilings never share a folder. Found without building the encoder."""
    features = cfg["features"]
    encoder = encoder_cache_name(features["encoder"], features["weights"], features["input_size"])
    variant = variant_name(features["tta"], float(features["stain_augmentation"]))
    return Path(cfg["paths"]["processed"]) / "embeddings" / f"{encoder}{variant}__{tiling_key(cfg)}"


def embedding_path(root: Path, source: str, image_id: str) -> Path:
    """One slide's h5 under an embeddings root."""
    return root / source / f"{image_id}.h5"


def embedding_paths(root: Path, table: pd.DataFrame) -> dict[str, Path]:
    """``slide_id -> h5 path`` for a table with ``slide_id``, ``source`` and ``image_id`` columns."""
    return {row.slide_id: embedding_path(root, row.source, row.image_id) for row in table.itertuples()}


def embedding_attrs(cfg: Mapping, encoder_name: str, weights_id: str, input_size: int, slide_id: str,
                    **extra: object) -> dict:
    """The attributes every embeddings h5 records (stage 03 adds the tile folder's fingerprint, stage 05
    whether the image is a TMA): what made the features, so they are never mixed with others."""
    features = cfg["features"]
    return {
        "encoder": encoder_name, "weights_sha256": weights_id, "input_size": int(input_size),
        "tile_size": int(cfg["tiling"]["tile_size"]), "magnification": float(cfg["tiling"]["target_magnification"]),
        "slide_id": slide_id, "tiling_key": tiling_key(cfg), "tta": str(features["tta"]),
        "stain_augmentation": float(features["stain_augmentation"]), **extra,
    }


# ------------------------------------------------------------------------------------------ runs (04-06)


def run_dir(cfg: Mapping) -> Path:
    """``{runs}/{experiment}``: one experiment's models, predictions and reports."""
    return Path(cfg["paths"]["runs"]) / str(cfg["experiment"])


@dataclass(frozen=True)
class ModelDir:
    """One trained model's folder in a run: its checkpoints (one per fold x seed) and reports."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    def checkpoint(self, fold: int, seed: int) -> Path:
        return self.path / f"fold{fold}_seed{seed}.pt"

    def checkpoints(self) -> list[Path]:
        return sorted(self.path.glob("fold*_seed*.pt"))

    @property
    def oof(self) -> Path:
        """Out-of-fold predictions: one row per validation slide and seed."""
        return self.path / "oof.csv"

    @property
    def curves(self) -> Path:
        return self.path / "curves.csv"

    @property
    def outlier(self) -> Path:
        """The model's own "Other" threshold, calibrated on its OOF predictions."""
        return self.path / "outlier.json"

    def predictions(self, shard: str | None) -> Path:
        """This shard's test predictions (files of another sharding layout are removed as stale)."""
        return shard_output(self.path, PREDICTIONS_FILE, shard)

    def has_predictions(self) -> bool:
        return any(self.path.glob("test_predictions*.csv"))

    def read_oof(self) -> pd.DataFrame:
        if not self.oof.is_file():
            raise FileNotFoundError(f"no OOF predictions {self.oof}: run stage 04")
        return pd.read_csv(self.oof, dtype={"image_id": str})

    def read_test_predictions(self) -> pd.DataFrame:
        """All shards of this model's test predictions, as one table (an id predicted twice is an error)."""
        paths = sorted(self.path.glob("test_predictions*.csv"))
        if not paths:
            raise FileNotFoundError(f"no test predictions in {self.path}: run stage 05")
        frame = pd.concat([pd.read_csv(p, dtype={"image_id": str}) for p in paths], ignore_index=True)
        repeated = frame["image_id"][frame["image_id"].duplicated()].unique().tolist()
        if repeated:
            raise ValueError(f"{self.path}: image ids predicted more than once across {[p.name for p in paths]}: "
                             f"{repeated[:5]} (rerun stage 05 with one sharding)")
        return frame


PREDICTIONS_FILE = "test_predictions.csv"


def model_dir(cfg: Mapping, name: str) -> ModelDir:
    return ModelDir(run_dir(cfg) / name)


def trained_models(cfg: Mapping) -> list[str]:
    """Names of the run's models that hold checkpoints, sorted."""
    run = run_dir(cfg)
    if not run.is_dir():
        return []
    return sorted(p.name for p in run.iterdir() if p.is_dir() and ModelDir(p).checkpoints())


def ensemble_report_path(cfg: Mapping) -> Path:
    return run_dir(cfg) / "ensemble.json"


def submission_path(cfg: Mapping) -> Path:
    return Path(cfg["paths"]["submissions"]) / f"{cfg['submit']['name']}.csv"


def _read_failures(paths: Iterable[Path]) -> pd.DataFrame:
    frames = [pd.read_csv(path) for path in sorted(paths)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(FailureLog.columns))
