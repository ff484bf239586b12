"""Stage 06: ensemble every model's OOF and test predictions, flag outliers as Other, write the submission.

The "Other" threshold is calibrated on the ensemble's OOF predictions only (never on test). Every
``test.csv`` id gets exactly one row; an image with no prediction (failed in stage 05) is labelled Other.
Only complete models are ensembled, and only with test predictions made from their current checkpoints
and from the test features the config gives (stage 05's record beside them): anything else is an error
naming the model, never a silent reuse or drop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from ubc_ocean import layout
from ubc_ocean.config import ConfigError, save_config
from ubc_ocean.io_utils import atomic_write_text
from ubc_ocean.sources import read_test_csv
from ubc_ocean.submit.submission import EnsembleCalibration, write_submission

log = logging.getLogger(__name__)


def run(cfg: Mapping) -> Path:
    """Write ``submissions/{submit.name}.csv`` and ``{run}/ensemble.json``; returns the submission path."""
    out = layout.run_dir(cfg)
    outlier = cfg["data"]["outlier_label"]
    models = layout.chosen_models(cfg)
    if not models:
        raise FileNotFoundError(f"no complete trained model in {out}: run stages 04-05")
    dirs = {m: layout.model_dir(cfg, m) for m in models}
    features = layout.test_features_fingerprint(cfg)
    for name, folder in dirs.items():
        problem = folder.stale_predictions(features)
        if problem:
            raise ConfigError(f"model {name!r}: {problem}: rerun stage 05 with this config "
                              "(or leave the model out with inference.models)")
    calibration = EnsembleCalibration.from_oof({m: dirs[m].read_oof() for m in models}, cfg)
    predicted = calibration.labels({m: dirs[m].read_test_predictions() for m in models})
    test_ids = read_test_csv(cfg)["image_id"].astype(str)
    missing = [i for i in test_ids if i not in predicted]
    if missing:
        log.warning("%d test images have no prediction; labelled %s: %s", len(missing), outlier, missing[:10])
    path = layout.submission_path(cfg)
    submission = write_submission(path, test_ids, predicted, outlier)
    threshold, metrics, weights, scores = (calibration.threshold, calibration.metrics, calibration.weights,
                                           calibration.scores)
    report = {
        "models": models, "weights": weights, "oof_balanced_accuracy_per_model": scores,
        "oof_balanced_accuracy": metrics["balanced_accuracy"], "oof_metrics": metrics,
        "outlier_threshold": {"score": threshold.score, "threshold": threshold.threshold,
                              "flag_rate": threshold.flag_rate},
        "test_images": len(submission), "test_missing": missing,
        "label_counts": submission["label"].value_counts().to_dict(), "submission": str(path),
    }
    atomic_write_text(layout.ensemble_report_path(cfg), json.dumps(report, indent=2))
    save_config(cfg, out, "config_06.yaml")
    log.info("stage 06: ensemble of %s, OOF balanced accuracy %.3f; %d test rows (%s) -> %s", models,
             metrics["balanced_accuracy"], len(submission), report["label_counts"], path)
    return path
