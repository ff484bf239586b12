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

import pandas as pd
from tqdm.auto import tqdm

from ubc_ocean import layout
from ubc_ocean.config import as_plain, save_config
from ubc_ocean.device import resolve_device
from ubc_ocean.folds import TRAIN_ONLY
from ubc_ocean.io_utils import FailureLog, atomic_write_csv
from ubc_ocean.mil.bags import load_bags
from ubc_ocean.mil.checkpoint import save_checkpoint
from ubc_ocean.mil.predict import prediction_frame
from ubc_ocean.mil.report import seed_mean, write_report
from ubc_ocean.mil.train import epoch_selection, fit, model_training_config
from ubc_ocean.outliers import calibrate_threshold

log = logging.getLogger(__name__)
STAGE = "04_train_cv"


def train_model(name: str, table: pd.DataFrame, bags: dict, cfg: Mapping, out: layout.ModelDir) -> dict:
    """Every fold x seed of one model; writes checkpoints, OOF, curves, metrics and the outlier threshold."""
    mil_cfg, classes = model_training_config(cfg["mil"], name), list(cfg["data"]["classes"])
    class_index = {label: i for i, label in enumerate(classes)}
    options = dict((mil_cfg["model_options"] or {}).get(name, {}))
    device = resolve_device(cfg["runtime"]["device"])
    if out.path.exists():  # stale checkpoints or test predictions would be averaged into stages 05-06
        log.info("%s: replacing the previous training in %s", name, out.path)
        shutil.rmtree(out.path)
    out.path.mkdir(parents=True)
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
        save_checkpoint(out.checkpoint(fold, seed), result.model, classes,
                        {"fold": int(fold), "seed": seed, "best_epoch": result.best_epoch,
                         "valid_balanced_accuracy": result.best_score, "config": as_plain(cfg),
                         "detector": result.detector.to_dict()})
        meta = valid[["slide_id", "image_id", "label", "is_tma", "fold"]].reset_index(drop=True)
        oof_rows.append(pd.concat([meta.assign(seed=seed), prediction_frame(result.valid, classes, result.detector)],
                                  axis=1))
        curves += [{"fold": int(fold), "seed": seed, **row} for row in result.curves]
    oof = pd.concat(oof_rows, ignore_index=True)
    atomic_write_csv(oof, out.oof)
    atomic_write_csv(pd.DataFrame(curves), out.curves)
    per_slide = seed_mean(oof, classes)
    metrics = write_report(per_slide, classes, out.path, name, notes={"epoch_selection": epoch_selection(mil_cfg)})
    score = cfg["outliers"]["score"]
    threshold = calibrate_threshold(per_slide[f"score_{score}"].to_numpy(), score,
                                    float(cfg["outliers"]["in_distribution_flag_rate"]))
    threshold.save(out.outlier)
    log.info("%s: OOF balanced accuracy %.3f (WSI %s, TMA %s)", name, metrics["balanced_accuracy"],
             _fmt(metrics["balanced_accuracy_wsi"]), _fmt(metrics["balanced_accuracy_tma"]))
    return metrics


def _show_epoch(bar: tqdm, fold: int, seed: int, row: dict) -> None:
    bar.set_postfix(fold=fold, seed=seed, epoch=row["epoch"], loss=f"{row['train_loss']:.3f}",
                    valid_ba=f"{row['valid_balanced_accuracy']:.3f}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run(cfg: Mapping) -> dict:
    """Train every model in ``mil.models``; returns ``{model: metrics}``."""
    out = layout.run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    table = layout.read_training_table(cfg)
    root = layout.embeddings_root(cfg)
    bags, problems = load_bags(layout.embedding_paths(root, table))
    failures = FailureLog(out / "failures_04.csv", STAGE)
    failures.path.unlink(missing_ok=True)
    for slide_id, message in problems.items():
        log.error("left out of training: %s", message)
        failures.record(slide_id, message)
    table = table[table["slide_id"].isin(bags)].reset_index(drop=True)
    if table.empty:
        raise RuntimeError(f"no usable bags under {root}: run stage 03 first")
    results = {name: train_model(name, table, bags, cfg, layout.model_dir(cfg, name)) for name in cfg["mil"]["models"]}
    return results
