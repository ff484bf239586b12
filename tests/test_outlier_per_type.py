""""Other" thresholds per slide type: TMAs and WSIs each flagged at the configured in-distribution rate.

Known answer: OOF scores of WSIs and TMAs come from two known normal distributions, the TMAs' shifted
higher (as a stain- and scale-shifted minority scores less confidently). A pooled threshold, set by the
WSIs, flags most TMAs; per-type thresholds flag each type at the target rate, on the calibration slides
and on fresh draws. Then the fallback for a type with too few slides, files saved before per-type
thresholds existed, the ensemble's labels per test image type, and stages 04-06 on the tiny pipeline.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from tests.builders import LEAN, tiny_config
from ubc_ocean import layout
from ubc_ocean.config import ConfigError, load_config
from ubc_ocean.metrics import seed_mean
from ubc_ocean.outliers import OutlierThreshold, calibrate_threshold, outlier_scores
from ubc_ocean.sources import is_tma_by_image
from ubc_ocean.submit.ensemble import ensemble_scores
from ubc_ocean.submit.submission import EnsembleCalibration

RATE = 0.05
WSI_MEAN, TMA_MEAN = 0.0, 2.0  # unit-variance scores; the TMAs' shifted two standard deviations up


def _scores(rng: np.random.Generator, n_wsi: int, n_tma: int) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([rng.normal(WSI_MEAN, 1, n_wsi), rng.normal(TMA_MEAN, 1, n_tma)])
    return values, np.r_[np.zeros(n_wsi, bool), np.ones(n_tma, bool)]


def test_pooled_threshold_overflags_tmas_and_per_type_thresholds_hit_the_rate():
    rng = np.random.default_rng(14)
    values, is_tma = _scores(rng, 4000, 200)  # TMAs 5% of the slides, as in training
    pooled = calibrate_threshold(values, "entropy", RATE)
    per_type = calibrate_threshold(values, "entropy", RATE, is_tma=is_tma)

    assert pooled.mode == "pooled" and per_type.mode == "per_type"
    assert per_type.threshold == pooled.threshold  # the pooled threshold is kept beside the per-type ones
    assert per_type.n_slides == {"wsi": 4000, "tma": 200} and per_type.fallback == []
    # the known answers: each type's (1 - rate) quantile of its own normal distribution
    assert per_type.per_type["wsi"] == pytest.approx(norm.ppf(1 - RATE, WSI_MEAN), abs=0.15)
    assert per_type.per_type["tma"] == pytest.approx(norm.ppf(1 - RATE, TMA_MEAN), abs=0.3)

    pooled_rates = pooled.flag_rates(values, is_tma)
    assert pooled_rates["all"] == pytest.approx(RATE, abs=0.005)
    assert pooled_rates["tma"] > 0.4 and pooled_rates["wsi"] < RATE  # TMAs flagged about ten times too often
    rates = per_type.flag_rates(values, is_tma)
    assert rates["wsi"] == pytest.approx(RATE, abs=0.005) and rates["tma"] == pytest.approx(RATE, abs=0.01)

    fresh, fresh_tma = _scores(np.random.default_rng(15), 20000, 20000)  # unseen slides of the same types
    fresh_rates = per_type.flag_rates(fresh, fresh_tma)
    assert fresh_rates["wsi"] == pytest.approx(RATE, abs=0.02) and fresh_rates["tma"] == pytest.approx(RATE, abs=0.03)
    assert pooled.flag_rates(fresh, fresh_tma)["tma"] > 0.4


def test_real_proportions_25_tmas_among_538_images():
    """As in the real training set: 25 TMAs (5 per class), 513 WSIs. The pooled threshold is the WSIs'."""
    values, is_tma = _scores(np.random.default_rng(538), 513, 25)
    pooled = calibrate_threshold(values, "entropy", RATE).flag_rates(values, is_tma)
    per_type = calibrate_threshold(values, "entropy", RATE, is_tma=is_tma).flag_rates(values, is_tma)
    assert pooled["tma"] > 0.3
    assert per_type["tma"] <= RATE + 1 / 25 and per_type["wsi"] == pytest.approx(RATE, abs=1 / 513 + 1e-9)


def test_a_type_with_too_few_slides_keeps_the_pooled_threshold(tmp_path, caplog):
    values, is_tma = _scores(np.random.default_rng(3), 200, 4)
    with caplog.at_level(logging.WARNING, logger="ubc_ocean.outliers.threshold"):
        threshold = calibrate_threshold(values, "entropy", RATE, is_tma=is_tma, min_slides=5)
    assert threshold.fallback == ["tma"] and threshold.n_slides == {"wsi": 200, "tma": 4}
    assert threshold.per_type["tma"] == threshold.threshold  # the pooled one
    assert threshold.per_type["wsi"] == pytest.approx(np.quantile(values[:200], 1 - RATE))
    assert "only 4 OOF TMA slides" in caplog.text and "keep the pooled threshold" in caplog.text
    # a NaN score does not count towards the minimum
    with_nan = np.r_[values, np.nan]
    assert calibrate_threshold(with_nan, "entropy", RATE, is_tma=np.r_[is_tma, True], min_slides=5).fallback == ["tma"]

    path = tmp_path / "outlier.json"
    threshold.save(path)
    loaded = OutlierThreshold.load(path)
    assert loaded == threshold and json.loads(path.read_text())["fallback"] == ["tma"]


def test_older_calibration_files_load_as_pooled(tmp_path):
    path = tmp_path / "outlier.json"
    path.write_text(json.dumps({"score": "entropy", "threshold": 0.5, "flag_rate": 0.05}))  # before per-type
    old = OutlierThreshold.load(path)
    assert old.mode == "pooled" and old.per_type == {} and old.fallback == []
    assert old.flag([0.4, 0.6]).tolist() == [False, True]
    assert old.flag([0.4, 0.6], np.array([True, False])).tolist() == [False, True]  # types change nothing


def test_per_type_flags_need_types_and_an_unknown_type_gets_the_pooled_threshold():
    threshold = OutlierThreshold("entropy", 0.5, RATE, per_type={"wsi": 0.3, "tma": 0.8})
    with pytest.raises(ValueError, match="per slide type"):
        threshold.flag([0.6])
    values = np.array([0.6, 0.6, 0.6, 0.9])
    assert threshold.flag(values, np.array([False, True, np.nan, True], dtype=object)).tolist() == \
        [True, False, True, True]
    assert threshold.flag(values, [False, True, None, True]).tolist() == [True, False, True, True]


def test_config_keys_default_to_pooled_and_are_checked():
    outliers = load_config(None).outliers
    assert outliers.per_type_thresholds is False and outliers.per_type_min_slides == 5
    with pytest.raises(ConfigError, match=r"outliers\.per_type_min_slides"):
        load_config(None, ["outliers.per_type_min_slides=0"])
    with pytest.raises(ConfigError, match=r"outliers\.per_type_thresholds"):
        load_config(None, ["outliers.per_type_thresholds=sometimes"])


def _oof(rng: np.random.Generator, n_wsi: int, n_tma: int, seed: int = 0) -> pd.DataFrame:
    """One model's OOF table: TMAs' probabilities flatter (higher entropy) than WSIs'."""
    n = n_wsi + n_tma
    is_tma = np.r_[np.zeros(n_wsi, bool), np.ones(n_tma, bool)]
    logits = rng.normal(0, 1, (n, 3)) + np.where(is_tma, 1.0, 4.0)[:, None] * np.eye(3)[rng.integers(0, 3, n)]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    frame = pd.DataFrame(probs, columns=["A", "B", "C"])
    ids = [f"s{i}" for i in range(n)]
    meta = pd.DataFrame({"slide_id": [f"train/{i}" for i in ids], "image_id": ids,
                         "label": np.array(["A", "B", "C"])[probs.argmax(1)],
                         "is_tma": is_tma, "fold": np.arange(n) % 2, "seed": seed})
    return pd.concat([meta, frame], axis=1)


def test_the_ensemble_holds_each_test_image_to_its_types_threshold():
    cfg = load_config(None, ["data.classes=[A,B,C]", "outliers.per_type_thresholds=true",
                             "outliers.in_distribution_flag_rate=0.1"])
    rng = np.random.default_rng(6)
    oof = {"m1": _oof(rng, 300, 60), "m2": _oof(rng, 300, 60)}
    calibration = EnsembleCalibration.from_oof(oof, cfg)
    threshold = calibration.threshold
    assert threshold.per_type["tma"] > threshold.per_type["wsi"]  # the TMAs' entropy is higher
    rates = calibration.flagging["in_distribution_flag_rate"]
    assert rates["wsi"] == pytest.approx(0.1, abs=0.01) and rates["tma"] == pytest.approx(0.1, abs=0.02)
    assert calibration.flagging["mode"] == "per_type"
    pooled = EnsembleCalibration.from_oof(oof, load_config(None, ["data.classes=[A,B,C]",
                                                                  "outliers.in_distribution_flag_rate=0.1"]))
    assert pooled.flagging["mode"] == "pooled" and pooled.flagging["in_distribution_flag_rate"]["tma"] > 0.4

    # two test images with the same predictions, between the two thresholds: Other only as a WSI
    middle = (threshold.per_type["wsi"] + threshold.per_type["tma"]) / 2
    probs = _probs_with_entropy(middle)
    test = {name: pd.DataFrame([["wsi_1", *probs], ["tma_1", *probs]], columns=["image_id", "A", "B", "C"])
            for name in oof}
    labels = calibration.labels(test, {"wsi_1": False, "tma_1": True})
    assert labels == {"wsi_1": "Other", "tma_1": "A"}
    with pytest.raises(ValueError, match="per slide type"):
        calibration.labels(test)


def _probs_with_entropy(target: float) -> list[float]:
    """Probabilities [p, q, q] (p largest) whose normalised entropy is ``target``, by bisection."""
    low, high = 1 / 3, 1.0
    for _ in range(60):
        p = (low + high) / 2
        q = (1 - p) / 2
        if outlier_scores(np.array([[p, q, q]]), "entropy")[0] > target:
            low = p
        else:
            high = p
    return [p, q, q]


# ------------------------------------------------------------------------- stages 04-06 on the tiny pipeline


def test_stages_report_flag_rates_per_type_pooled_by_default(pipeline):
    """The session's tiny run (pooled, the default) reports the OOF flag rate for WSIs and TMAs apart."""
    cfg = tiny_config(pipeline, *LEAN)
    metrics = json.loads((layout.model_dir(cfg, "abmil").path / "metrics.json").read_text())
    outlier = metrics["outlier"]
    assert outlier["mode"] == "pooled" and outlier["per_type"] == {}
    assert set(outlier["in_distribution_flag_rate"]) == {"all", "wsi", "tma"}
    assert OutlierThreshold.load(layout.model_dir(cfg, "abmil").outlier).mode == "pooled"


def test_stages_04_to_06_calibrate_and_apply_per_type_thresholds(pipeline, tmp_path):
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train
    from ubc_ocean.submit.stage import run as submit

    root = tmp_path / "data"
    shutil.copytree(pipeline, root)
    cfg = tiny_config(root, *LEAN, "outliers.per_type_thresholds=true", "outliers.in_distribution_flag_rate=0.2")
    train(cfg)
    model = layout.model_dir(cfg, "abmil")
    threshold = OutlierThreshold.load(model.outlier)
    assert threshold.mode == "per_type" and threshold.fallback == []
    assert threshold.n_slides == {"wsi": 10, "tma": 5}  # the tiny data: 2 WSIs and 1 TMA per class
    per_slide = seed_mean(model.read_oof(), cfg.data.classes)
    is_tma = per_slide["is_tma"].to_numpy(bool)
    entropy = per_slide["score_entropy"].to_numpy()
    for kind, members in (("wsi", ~is_tma), ("tma", is_tma)):
        assert threshold.per_type[kind] == pytest.approx(np.quantile(entropy[members], 0.8))
    reported = json.loads((model.path / "metrics.json").read_text())["outlier"]
    assert reported["in_distribution_flag_rate"] == pytest.approx(
        {"all": float(threshold.flag(entropy, is_tma).mean()), "wsi": 2 / 10, "tma": 1 / 5})

    infer(cfg)
    path = submit(cfg)
    report = json.loads(layout.ensemble_report_path(cfg).read_text())
    assert report["outlier_threshold"]["mode"] == "per_type"
    assert report["outlier_threshold"]["in_distribution_flag_rate"]["tma"] == pytest.approx(1 / 5)
    # every test image held to its type's threshold, its type from test.csv's size (no is_tma column)
    types = is_tma_by_image(cfg)
    assert set(types.values()) == {True, False}
    test = model.read_test_predictions().set_index("image_id")
    scores = ensemble_scores(test, cfg.data.classes, "entropy")
    expected = _threshold_of(report["outlier_threshold"]).flag(scores, test.index.map(types).to_numpy())
    submission = pd.read_csv(path, dtype={"image_id": str}).set_index("image_id").loc[test.index]
    assert (submission["label"] == "Other").tolist() == expected.tolist()
    shares = report["test_other_share"]
    assert shares["tma"] == pytest.approx(float(expected[test.index.map(types).to_numpy(bool)].mean()))

    fallback = tiny_config(root, *LEAN, "outliers.per_type_thresholds=true", "outliers.per_type_min_slides=6")
    submit(fallback)  # 5 OOF TMAs: fewer than 6, so TMAs keep the pooled threshold
    report = json.loads(layout.ensemble_report_path(fallback).read_text())["outlier_threshold"]
    assert report["fallback"] == ["tma"] and report["per_type"]["tma"] == report["threshold"]


def _threshold_of(summary: dict) -> OutlierThreshold:
    return OutlierThreshold(**{k: summary[k] for k in ("score", "threshold", "flag_rate", "per_type", "fallback",
                                                       "n_slides")})


def test_is_tma_by_image_uses_the_size_rule_without_a_column(tiny_raw):
    truth = pd.read_csv(tiny_raw.paths.hidden_test_labels, dtype={"image_id": str})
    assert is_tma_by_image(tiny_raw) == dict(zip(truth.image_id, truth.is_tma.astype(bool), strict=True))
    assert Path(tiny_raw.paths.raw, "test.csv").read_text().splitlines()[0] == "image_id,image_width,image_height"
