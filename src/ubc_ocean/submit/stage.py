"""Stage 06: ensemble every model's OOF and test predictions, flag outliers as Other, write the submission.

The models are the config's experiment's, or those of several experiments (``submit.experiments``: e.g. one
per encoder, each predicted by its own stage 05), averaged together as ``{experiment}/{model}``.

The "Other" threshold is calibrated on the ensemble's OOF predictions only (never on test), pooled or per slide
type (``outliers.per_type_thresholds``: each test image's type from ``test.csv``, by the size rule). Every
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
from ubc_ocean.outliers import share_by_type
from ubc_ocean.sources import is_tma_by_image, read_test_csv
from ubc_ocean.submit.submission import EnsembleCalibration, write_submission

log = logging.getLogger(__name__)


def ensemble_members(cfg: Mapping) -> dict[str, layout.ModelDir]:
    """The models to ensemble, by name: the config's experiment's (``layout.chosen_models``), or with
    ``submit.experiments`` every complete model of each experiment named, as ``{experiment}/{model}``. Each
    must have test predictions made from its current checkpoints and from the test features of its own
    encoder and tiling (the config's, for the config's experiment): else a ``ConfigError`` naming it."""
    experiments = cfg["submit"]["experiments"]
    if not experiments:
        models = layout.required_models(cfg)
        members = {m: layout.model_dir(cfg, m) for m in models}
    else:
        members = {}
        for experiment in experiments:
            models = layout.chosen_models(cfg, experiment) if layout.run_dir(cfg, experiment).is_dir() else []
            if not models:
                raise ConfigError(f"submit.experiments names {experiment!r}, which has no complete trained model in "
                                  f"{layout.run_dir(cfg, experiment)}: train it (stage 04) or leave it out")
            members |= {f"{experiment}/{m}": layout.model_dir(cfg, m, experiment) for m in models}
    own = str(cfg["experiment"])
    features = layout.test_features_fingerprint(cfg)
    for name, folder in members.items():
        mine = not experiments or name.split("/", 1)[0] == own
        problem = folder.stale_predictions(features if mine else None)
        if problem and mine:
            raise ConfigError(f"model {name!r}: {problem}: rerun stage 05 with this config "
                              "(or leave the model out with inference.models)")
        if problem:
            raise ConfigError(f"model {name!r}: {problem}: rerun stage 05 with experiment "
                              f"{name.split('/', 1)[0]!r}'s config (or leave it out of submit.experiments)")
    return members


def oof_calibration(cfg: Mapping) -> EnsembleCalibration:
    """The ensemble of the config's experiment (its complete models, ``inference.models`` where set) calibrated
    on their OOF predictions alone: what stage 06 reports as OOF, without test predictions (the benchmark's
    grouped-folds runs train no model for test)."""
    return EnsembleCalibration.from_oof({m: layout.model_dir(cfg, m).read_oof() for m in layout.required_models(cfg)},
                                        cfg)


def run(cfg: Mapping) -> Path:
    """Write ``submissions/{submit.name}.csv`` and ``{predictions}/{experiment}/ensemble.json``; returns the
    submission path."""
    layout.require_writable(cfg, "predictions", "submissions")  # trained models may be read-only (Kaggle)
    out = layout.predictions_dir(cfg)
    outlier = cfg["data"]["outlier_label"]
    dirs = ensemble_members(cfg)
    models = list(dirs)
    calibration = EnsembleCalibration.from_oof({m: dirs[m].read_oof() for m in models}, cfg)
    is_tma = is_tma_by_image(cfg)
    predicted = calibration.labels({m: dirs[m].read_test_predictions() for m in models}, is_tma)
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
        "outlier_threshold": calibration.flagging,
        "test_other_share": share_by_type(submission["label"].eq(outlier),  # flagged or unpredicted
                                          [is_tma.get(i, False) for i in submission["image_id"]]),
        "test_images": len(submission), "test_missing": missing,
        "label_counts": submission["label"].value_counts().to_dict(), "submission": str(path),
    }
    atomic_write_text(layout.ensemble_report_path(cfg), json.dumps(report, indent=2))
    save_config(cfg, out, "config_06.yaml")
    rates = calibration.flagging["in_distribution_flag_rate"]
    log.info("stage 06: ensemble of %s, OOF balanced accuracy %.3f; %s %s threshold flags %.3f of OOF slides "
             "(WSI %s, TMA %s); %d test rows (%s) -> %s", models, metrics["balanced_accuracy"], threshold.mode,
             threshold.score, rates["all"], rates["wsi"], rates["tma"], len(submission), report["label_counts"], path)
    return path
