"""Stage 04: cross-validated training of every configured MIL model, OOF predictions and calibration.

Run folder ``{paths.runs}/{experiment}/``::

    config.yaml, failures_04.csv
    {model}/fold{k}_seed{s}.pt   checkpoints (weights + model config + classes)
    {model}/oof.csv              image_id, slide_id, fold, seed, label, is_tma, one column per class
    {model}/metrics.json         balanced accuracy (all, WSI, TMA), per-class recall
    {model}/confusion.csv|png, curves.csv, outlier.json (threshold calibrated on OOF)
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ubc_ocean.config import ConfigError, as_plain, save_config
from ubc_ocean.device import resolve_device
from ubc_ocean.external.merge import folds_path
from ubc_ocean.features import cache
from ubc_ocean.features.encoders import encoder_cache_name
from ubc_ocean.features.stage import read_manifest
from ubc_ocean.folds import TRAIN_ONLY
from ubc_ocean.io_utils import FailureLog, atomic_write_csv
from ubc_ocean.mil.bags import load_bags
from ubc_ocean.mil.checkpoint import save_checkpoint
from ubc_ocean.mil.report import seed_mean, write_report
from ubc_ocean.mil.train import BagOutputs, epoch_selection, fit
from ubc_ocean.outliers import FeatureSpaceDetector, calibrate_threshold, score_table

log = logging.getLogger(__name__)
STAGE = "04_train_cv"


def run_dir(cfg: Mapping) -> Path:
    return Path(cfg["paths"]["runs"]) / str(cfg["experiment"])


def embeddings_root_from_config(cfg: Mapping) -> Path:
    """Where stage 03 put this config's embeddings (found without building the encoder)."""
    features = cfg["features"]
    name = encoder_cache_name(features["encoder"], features["weights"], features["input_size"])
    return cache.embeddings_root(cfg, name)


def training_table(cfg: Mapping) -> pd.DataFrame:
    """Manifest joined with folds (one row per training slide)."""
    manifest = read_manifest(cfg)
    path = folds_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run stage 02 first")
    folds = pd.read_csv(path, dtype={"image_id": str})[["slide_id", "fold"]]
    return manifest.merge(folds, on="slide_id", how="inner", validate="one_to_one")


_NOT_PER_MODEL = ("models", "model_options", "model_training")


def model_training_config(mil_cfg: Mapping, name: str) -> dict:
    """The ``mil`` section as model ``name`` trains with it: ``mil.model_training[name]`` replaces the
    training keys it names (``lr``, ``epochs``, ...). An unknown or non-training key is an error naming it."""
    overrides = dict((mil_cfg.get("model_training") or {}).get(name) or {})
    allowed = sorted(key for key in mil_cfg if key not in _NOT_PER_MODEL)
    for key in overrides:
        if key not in allowed:
            raise ConfigError(f"mil.model_training.{name}.{key} is not a per-model training key "
                           f"(choose among: {', '.join(allowed)})")
    merged = {**mil_cfg, **overrides}
    epoch_selection(merged)
    return merged


def train_model(name: str, table: pd.DataFrame, bags: dict, cfg: Mapping, out: Path) -> dict:
    """Every fold x seed of one model; writes checkpoints, OOF, curves, metrics and the outlier threshold."""
    mil_cfg, classes = model_training_config(cfg["mil"], name), list(cfg["data"]["classes"])
    class_index = {label: i for i, label in enumerate(classes)}
    options = dict((mil_cfg["model_options"] or {}).get(name, {}))
    device = resolve_device(cfg["runtime"]["device"])
    if out.exists():  # stale checkpoints or test predictions would be averaged into stages 05-06
        log.info("%s: replacing the previous training in %s", name, out)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    folds = sorted(f for f in table["fold"].unique() if f != TRAIN_ONLY)
    seeds = [int(s) for s in mil_cfg["seeds"]]
    oof_rows, curves = [], []
    runs = [(fold, seed) for fold in folds for seed in seeds]
    bar = tqdm(runs, desc=f"{name} folds x seeds", unit="fit", dynamic_ncols=True)
    for fold, seed in bar:
        train = table[table["fold"] != fold]
        valid = table[table["fold"] == fold]
        result = fit(
            name, options,
            [bags[s] for s in train["slide_id"]], [class_index[c] for c in train["label"]],
            [bags[s] for s in valid["slide_id"]], [class_index[c] for c in valid["label"]],
            len(classes), mil_cfg, seed=int(cfg["seed"]) * 1000 + seed, device=device,
            desc=f"{name} fold {fold} seed {seed}", knn_k=int(cfg["outliers"]["knn_k"]),
            progress=functools.partial(_show_epoch, bar, fold, seed),
        )
        log.info("%s fold %d seed %d: best valid BA %.3f at epoch %d",
                 name, fold, seed, result.best_score, result.best_epoch)
        save_checkpoint(out / f"fold{fold}_seed{seed}.pt", result.model, classes,
                        {"fold": int(fold), "seed": seed, "best_epoch": result.best_epoch,
                         "valid_balanced_accuracy": result.best_score, "config": as_plain(cfg),
                         "detector": result.detector.to_dict()})
        meta = valid[["slide_id", "image_id", "label", "is_tma", "fold"]].reset_index(drop=True)
        oof_rows.append(pd.concat([meta.assign(seed=seed), prediction_frame(result.valid, classes, result.detector)],
                                  axis=1))
        curves += [{"fold": int(fold), "seed": seed, **row} for row in result.curves]
    oof = pd.concat(oof_rows, ignore_index=True)
    atomic_write_csv(oof, out / "oof.csv")
    atomic_write_csv(pd.DataFrame(curves), out / "curves.csv")
    per_slide = seed_mean(oof, classes)
    metrics = write_report(per_slide, classes, out, name, notes={"epoch_selection": epoch_selection(mil_cfg)})
    score = cfg["outliers"]["score"]
    threshold = calibrate_threshold(per_slide[f"score_{score}"].to_numpy(), score,
                                    float(cfg["outliers"]["in_distribution_flag_rate"]))
    threshold.save(out / "outlier.json")
    log.info("%s: OOF balanced accuracy %.3f (WSI %s, TMA %s)", name, metrics["balanced_accuracy"],
             _fmt(metrics["balanced_accuracy_wsi"]), _fmt(metrics["balanced_accuracy_tma"]))
    return metrics


def prediction_frame(outputs: BagOutputs, classes: list[str], detector: FeatureSpaceDetector | None) -> pd.DataFrame:
    """One row per bag: a probability column per class, then a ``score_*`` column per outlier score."""
    frame = pd.DataFrame(outputs.probs, columns=classes)
    for name, values in score_table(outputs.probs, outputs.logits, outputs.embeddings, detector).items():
        frame[f"score_{name}"] = values
    return frame


def _show_epoch(bar: tqdm, fold: int, seed: int, row: dict) -> None:
    bar.set_postfix(fold=fold, seed=seed, epoch=row["epoch"], loss=f"{row['train_loss']:.3f}",
                    valid_ba=f"{row['valid_balanced_accuracy']:.3f}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run(cfg: Mapping) -> dict:
    """Train every model in ``mil.models``; returns ``{model: metrics}``."""
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    table = training_table(cfg)
    root = embeddings_root_from_config(cfg)
    paths = {row.slide_id: cache.embedding_path(root, row.source, row.image_id) for row in table.itertuples()}
    bags, problems = load_bags(paths)
    failures = FailureLog(out / "failures_04.csv", STAGE)
    failures.path.unlink(missing_ok=True)
    for slide_id, message in problems.items():
        log.error("left out of training: %s", message)
        failures.record(slide_id, message)
    table = table[table["slide_id"].isin(bags)].reset_index(drop=True)
    if table.empty:
        raise RuntimeError(f"no usable bags under {root}: run stage 03 first")
    for name in cfg["mil"]["models"]:
        model_training_config(cfg["mil"], name)  # a misspelt per-model key fails before any training
    results = {name: train_model(name, table, bags, cfg, out / name) for name in cfg["mil"]["models"]}
    return results
