import numpy as np
import pandas as pd
import pytest

from ubc_ocean.folds import TRAIN_ONLY, assign_folds, small_classes
from ubc_ocean.metrics import balanced_accuracy, chance_balanced_accuracy, per_class_recall
from ubc_ocean.outliers import calibrate_threshold, outlier_scores


def _table(n_per_class=6, external=4):
    rows = []
    for label in ["CC", "EC", "HGSC"]:
        for i in range(n_per_class):
            rows.append({"slide_id": f"train/{label}{i}", "label": label, "is_tma": i == 0,
                         "group": f"p{label}{i // 2}", "external": False})
    for i in range(external):
        rows.append({"slide_id": f"ext/{i}", "label": "CC", "is_tma": False, "group": f"e{i}", "external": True})
    return pd.DataFrame(rows)


def test_folds_stratified_and_external_train_only():
    frame = _table()
    folds = assign_folds(frame, 3, seed=0, validate_mask=~frame["external"])
    assert (folds[frame["external"]] == TRAIN_ONLY).all()
    internal = frame[~frame["external"]].assign(fold=folds)
    counts = internal.groupby(["fold", "label"]).size().unstack()
    assert (counts == 2).all().all()  # 6 per class over 3 folds
    assert assign_folds(frame, 3, seed=0, validate_mask=~frame["external"]).equals(folds)  # seeded


def test_groups_never_straddle_folds():
    frame = _table()
    folds = assign_folds(frame, 3, seed=1, group_column="group", validate_mask=~frame["external"])
    internal = frame.assign(fold=folds)[~frame["external"]]
    assert (internal.groupby("group")["fold"].nunique() == 1).all()


def test_class_smaller_than_folds_is_named_and_still_folded():
    frame = _table(n_per_class=6, external=0)
    frame = frame[~((frame.label == "CC") & (frame.slide_id > "train/CC1"))]  # CC keeps 2 slides
    assert small_classes(frame, 3) == {"CC": 2}
    folds = assign_folds(frame, 3, seed=0)
    assert set(folds) == {0, 1, 2}
    assert folds[frame.label == "CC"].nunique() == 2  # each CC slide validates in some fold
    with pytest.raises(ValueError, match="no class has 3 slides"):
        assign_folds(_table(n_per_class=2, external=0), 3, seed=0)


def test_chance_balanced_accuracy_is_a_permutation_test():
    """Against shuffled labels any predictions score 1/k on average; the 99th percentile narrows with n
    (about 1/k + 2.3 standard deviations), and guessing stays below it while a real signal clears it."""
    rng = np.random.default_rng(0)
    classes = np.array(["CC", "EC", "HGSC", "LGSC", "MC"])
    for n, (low, high) in ((500, (0.22, 0.27)), (40, (0.3, 0.5))):
        truth = classes[np.arange(n) % 5]
        chance, upper = chance_balanced_accuracy(truth, truth)  # a perfect model, shuffled
        assert chance == pytest.approx(0.2) and low < upper < high
    truth = classes[np.arange(500) % 5]
    guesses = rng.choice(classes, 500)
    assert balanced_accuracy(truth, guesses) < chance_balanced_accuracy(truth, guesses)[1]
    noisy = np.where(rng.random(500) < 0.3, truth, guesses)  # right 30% of the time, else a guess
    assert balanced_accuracy(truth, noisy) > chance_balanced_accuracy(truth, noisy)[1]
    assert chance_balanced_accuracy(truth[:4], ["CC", "XX", "EC", "EC"])[0] == pytest.approx(0.25)


def test_balanced_accuracy_is_mean_recall():
    truth = ["A", "A", "A", "B"]
    pred = ["A", "A", "B", "B"]
    assert balanced_accuracy(truth, pred) == pytest.approx((2 / 3 + 1) / 2)
    recall = per_class_recall(truth, pred, ["A", "B", "C"])
    assert recall["A"] == pytest.approx(2 / 3) and recall["B"] == 1.0 and np.isnan(recall["C"])


def test_outlier_scores_order_confident_below_uncertain():
    probs = np.array([[0.97, 0.01, 0.02], [0.4, 0.3, 0.3], [1 / 3, 1 / 3, 1 / 3]])
    for name in ("max_prob", "entropy"):
        scores = outlier_scores(probs, name)
        assert scores[0] < scores[1] < scores[2]
    assert outlier_scores(probs, "entropy")[2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown probability score"):
        outlier_scores(probs, "nope")


def test_threshold_flags_the_configured_fraction():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(400, 5)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = outlier_scores(probs, "entropy")
    threshold = calibrate_threshold(scores, "entropy", 0.1)
    assert threshold.flag(scores).mean() == pytest.approx(0.1, abs=0.01)
    assert not calibrate_threshold(scores, "entropy", 0.0).flag(scores).any()
    with pytest.raises(ValueError, match="unknown outlier score"):
        calibrate_threshold(scores, "softmax", 0.1)


def test_feature_space_detector_scores_far_bags_higher():
    from ubc_ocean.outliers import FeatureSpaceDetector, score_table

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    labels = np.repeat(np.arange(3), 40)
    train = centres[labels] + rng.normal(size=(120, 16))
    detector = FeatureSpaceDetector.fit(train, labels, n_classes=4, k=5)  # class 3 never seen
    known = centres[[0, 1, 2]] + rng.normal(size=(3, 16))
    unknown = rng.normal(size=(3, 16)) * 4 + 12
    for name in ("mahalanobis", "knn"):
        scores = detector.scores(np.concatenate([known, unknown]))[name]
        assert scores[:3].max() < scores[3:].min(), name
    restored = FeatureSpaceDetector.from_dict(detector.to_dict())
    assert np.allclose(restored.mahalanobis(unknown), detector.mahalanobis(unknown))
    logits = np.array([[8.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    table = score_table(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), logits)
    assert set(table) == {"max_prob", "entropy", "energy"} and table["energy"][0] < table["energy"][1]
