"""Stage 06: ensemble every model's OOF and test predictions, flag outliers as Other, write the submission.

The "Other" threshold is calibrated on the ensemble's OOF predictions only (never on test). Every
``test.csv`` id gets exactly one row; an image with no prediction (failed in stage 05) is labelled Other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ubc_ocean.config import save_config
from ubc_ocean.inference.stage import read_test_predictions
from ubc_ocean.io_utils import atomic_write_csv, atomic_write_text
from ubc_ocean.mil.report import oof_metrics, seed_mean
from ubc_ocean.mil.stage import run_dir
from ubc_ocean.outliers import PROBABILITY_SCORES, calibrate_threshold, outlier_scores
from ubc_ocean.sources import read_test_csv

log = logging.getLogger(__name__)


def submission_path(cfg: Mapping) -> Path:
    return Path(cfg["paths"]["submissions"]) / f"{cfg['submit']['name']}.csv"


def ensemble_weights(oof_scores: Mapping[str, float], mode: str) -> dict[str, float]:
    """``equal`` or ``oof`` (proportional to each model's OOF balanced accuracy); weights sum to 1."""
    if mode == "equal":
        raw = {name: 1.0 for name in oof_scores}
    elif mode == "oof":
        raw = {name: max(score, 1e-6) for name, score in oof_scores.items()}
    else:
        raise ValueError(f"unknown submit.weighting {mode!r} (equal | oof)")
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


def weighted_mean(frames: Mapping[str, pd.DataFrame], weights: Mapping[str, float], key: str,
                  columns: Sequence[str]) -> pd.DataFrame:
    """Weighted mean of ``columns`` over tables keyed by ``key``, on the union of their keys: each row
    averages the models that predicted it, their weights renormalised (a row no model predicted in full
    stays NaN). Other columns come from the first table holding the row."""
    columns = list(columns)
    tables = [(name, frame.set_index(key)) for name, frame in frames.items()]
    index = pd.Index(sorted(set().union(*(table.index for _, table in tables))), name=key)
    total = pd.DataFrame(0.0, index=index, columns=columns)
    weight = pd.Series(0.0, index=index)
    rest = None
    for name, table in tables:
        values = table[columns].reindex(index).astype(float)
        present = values.notna().all(axis=1)
        total = total + values.where(present, 0.0).mul(weights[name])
        weight = weight + present * weights[name]
        others = table.drop(columns=columns)
        rest = others if rest is None else rest.combine_first(others)
    if (weight < 1.0 - 1e-9).any():
        log.warning("%d of %d %s rows lack some model's prediction: averaged over the models that have them",
                    int((weight < 1.0 - 1e-9).sum()), len(index), key)
    mean = total.div(weight.where(weight > 0), axis=0)
    return pd.concat([rest.reindex(index), mean], axis=1).reset_index()


def ensemble_scores(frame: pd.DataFrame, classes: Sequence[str], score: str) -> np.ndarray:
    """The outlier score of ensembled rows: recomputed from the mean probabilities for ``max_prob`` and
    ``entropy``; the models' weighted mean ``score_*`` column otherwise."""
    if score in PROBABILITY_SCORES:
        return outlier_scores(frame[list(classes)].to_numpy(), score)
    return frame[f"score_{score}"].to_numpy()


def label_predictions(probs: np.ndarray, flagged: np.ndarray, classes: Sequence[str], outlier: str) -> np.ndarray:
    labels = np.asarray(classes, dtype=object)[probs.argmax(1)]
    labels[flagged] = outlier
    return labels


def run(cfg: Mapping) -> Path:
    """Write ``submissions/{submit.name}.csv`` and ``{run}/ensemble.json``; returns the submission path."""
    out = run_dir(cfg)
    classes = list(cfg["data"]["classes"])
    outlier = cfg["data"]["outlier_label"]
    models = sorted(p.parent.name for p in out.glob("*/oof.csv") if any(p.parent.glob("test_predictions*.csv")))
    if cfg["inference"]["models"]:
        models = [m for m in models if m in cfg["inference"]["models"]]
    if not models:
        raise FileNotFoundError(f"no model in {out} has both oof.csv and test predictions: run stages 04-05")
    oof = {m: seed_mean(pd.read_csv(out / m / "oof.csv", dtype={"image_id": str}), classes) for m in models}
    scores = {m: oof_metrics(frame, classes)["balanced_accuracy"] for m, frame in oof.items()}
    weights = ensemble_weights(scores, cfg["submit"]["weighting"])
    score = cfg["outliers"]["score"]
    columns = [*classes, f"score_{score}"] if score not in PROBABILITY_SCORES else classes
    oof_ensemble = weighted_mean(oof, weights, "slide_id", columns)
    metrics = oof_metrics(oof_ensemble, classes)
    threshold = calibrate_threshold(ensemble_scores(oof_ensemble, classes, score), score,
                                    float(cfg["outliers"]["in_distribution_flag_rate"]))
    test = {m: read_test_predictions(out / m) for m in models}
    test_ensemble = weighted_mean(test, weights, "image_id", columns)
    unpredicted = ~np.isfinite(test_ensemble[classes].to_numpy()).all(axis=1)
    flagged = threshold.flag(ensemble_scores(test_ensemble, classes, score)) | unpredicted
    labels = label_predictions(test_ensemble[classes].to_numpy(), flagged, classes, outlier)
    predicted = dict(zip(test_ensemble["image_id"].astype(str), labels, strict=True))
    test_ids = read_test_csv(cfg)["image_id"].astype(str)
    missing = [i for i in test_ids if i not in predicted]
    if missing:
        log.warning("%d test images have no prediction; labelled %s: %s", len(missing), outlier, missing[:10])
    submission = pd.DataFrame({"image_id": test_ids, "label": [predicted.get(i, outlier) for i in test_ids]})
    path = submission_path(cfg)
    atomic_write_csv(submission, path)
    report = {
        "models": models, "weights": weights, "oof_balanced_accuracy_per_model": scores,
        "oof_balanced_accuracy": metrics["balanced_accuracy"], "oof_metrics": metrics,
        "outlier_threshold": {"score": threshold.score, "threshold": threshold.threshold,
                              "flag_rate": threshold.flag_rate},
        "test_images": len(submission), "test_missing": missing,
        "label_counts": submission["label"].value_counts().to_dict(), "submission": str(path),
    }
    atomic_write_text(out / "ensemble.json", json.dumps(report, indent=2))
    save_config(cfg, out, "config_06.yaml")
    log.info("stage 06: ensemble of %s, OOF balanced accuracy %.3f; %d test rows (%s) -> %s", models,
             metrics["balanced_accuracy"], len(submission), report["label_counts"], path)
    return path
