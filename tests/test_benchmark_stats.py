"""Bootstrap statistics of the benchmark, on predictions drawn from known distributions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ubc_ocean.benchmark.stats import choose_best, paired_difference, summarise
from ubc_ocean.metrics import (
    balanced_accuracy,
    balanced_accuracy_draws,
    bootstrap_counts,
    percentile_interval,
    proportion_draws,
)
from ubc_ocean.submit.score import scored_frame

CLASSES = ["CC", "EC", "HGSC", "LGSC", "MC", "Other"]


def _draw(rng: np.random.Generator, truth: np.ndarray, p_correct: dict[str, float]) -> np.ndarray:
    """Each image labelled correctly with its class's probability, else with another class at random."""
    pred = truth.copy()
    for i, label in enumerate(truth):
        if rng.random() >= p_correct[label]:
            pred[i] = rng.choice([c for c in CLASSES if c != label])
    return pred


def _frame(truth: np.ndarray, pred: np.ndarray, tma: np.ndarray) -> pd.DataFrame:
    ids = [f"{i:04d}" for i in range(len(truth))]
    return scored_frame(pd.DataFrame({"image_id": ids, "label": pred}),
                        pd.DataFrame({"image_id": ids, "label": truth, "is_tma": tma}))


def test_one_resample_of_ones_is_the_plain_metric():
    rng = np.random.default_rng(0)
    truth = rng.choice(CLASSES, 200)
    pred = _draw(rng, truth, dict.fromkeys(CLASSES, 0.6))
    ones = np.ones((1, len(truth)), dtype=np.int64)
    assert balanced_accuracy_draws(truth, pred, CLASSES, ones)[0] == pytest.approx(balanced_accuracy(truth, pred))
    tma = rng.random(200) < 0.7
    assert balanced_accuracy_draws(truth, pred, CLASSES, ones, tma)[0] == pytest.approx(
        balanced_accuracy(truth[tma], pred[tma]))
    counts = bootstrap_counts(200, 50, seed=3)
    assert counts.shape == (50, 200) and (counts.sum(1) == 200).all()
    assert np.array_equal(counts, bootstrap_counts(200, 50, seed=3))  # seeded
    assert np.isnan(proportion_draws(np.ones(3, bool), np.zeros(3, bool), bootstrap_counts(3, 4))).all()


def test_interval_covers_the_true_balanced_accuracy_at_about_the_nominal_rate():
    """Per class, each image is right with a known probability: the true BA is their mean. Over 200 fresh
    test sets, the 95% interval holds it about 95% of the time."""
    p_correct = {"CC": 0.8, "EC": 0.7, "HGSC": 0.9, "LGSC": 0.5, "MC": 0.6, "Other": 0.4}
    true_ba = float(np.mean(list(p_correct.values())))
    rng = np.random.default_rng(1)
    covered, widths = [], []
    for trial in range(200):
        truth = rng.choice(CLASSES, 300, p=[0.1, 0.15, 0.35, 0.1, 0.1, 0.2])
        pred = _draw(rng, truth, p_correct)
        draws = balanced_accuracy_draws(truth, pred, CLASSES, bootstrap_counts(300, 400, seed=trial))
        low, high = percentile_interval(draws, 0.95)
        covered.append(low <= true_ba <= high)
        widths.append(high - low)
    assert 0.88 <= np.mean(covered) <= 0.99
    assert 0.05 < np.median(widths) < 0.2  # the 6 classes of about 30-100 images each


def test_paired_difference_of_identical_predictions_is_exactly_zero():
    rng = np.random.default_rng(2)
    truth = rng.choice(CLASSES, 150)
    frame = _frame(truth, _draw(rng, truth, dict.fromkeys(CLASSES, 0.6)), rng.random(150) < 0.7)
    counts = bootstrap_counts(len(frame), 300, seed=0)
    for metric in ("test_ba", "tma_ba", "other_recall"):
        diff = paired_difference(frame, frame.copy(), "Other", counts, metric)
        assert (diff.value, diff.low, diff.high) == (0.0, 0.0, 0.0)


def test_a_planted_better_configuration_has_a_positive_interval():
    """Configuration A is right 80% of the time, B 60%, on the same images: the paired interval of A - B
    lies above 0 and holds the true 0.2; unpaired, their own intervals overlap more than the paired one says."""
    rng = np.random.default_rng(4)
    truth = rng.choice(CLASSES, 300)
    tma = rng.random(300) < 0.7
    better = _frame(truth, _draw(rng, truth, dict.fromkeys(CLASSES, 0.8)), tma)
    worse = _frame(truth, _draw(rng, truth, dict.fromkeys(CLASSES, 0.6)), tma)
    counts = bootstrap_counts(300, 1000, seed=0)
    diff = paired_difference(better, worse, "Other", counts)
    assert 0 < diff.low < 0.2 < diff.high
    assert diff.value == pytest.approx(summarise(better, "Other", counts)["test_ba"].value
                                       - summarise(worse, "Other", counts)["test_ba"].value)
    reverse = paired_difference(worse, better, "Other", counts)
    assert reverse.high < 0 and reverse.value == pytest.approx(-diff.value)
    with pytest.raises(ValueError, match="different test images"):
        paired_difference(better, worse.iloc[1:], "Other", counts)


def test_summary_splits_wsis_tmas_and_other():
    """Known counts: Other is found on every TMA and no WSI; one in-distribution TMA of four is flagged."""
    truth = np.array(["Other", "Other", "Other", "Other", "CC", "CC", "EC", "EC", "CC", "EC"])
    tma = np.array([True, True, False, False, True, True, True, True, False, False])
    pred = np.array(["Other", "Other", "CC", "EC", "Other", "CC", "EC", "EC", "CC", "EC"])
    summary = summarise(_frame(truth, pred, tma), "Other", bootstrap_counts(10, 200, seed=0))
    assert summary["other_recall"].value == 0.5
    assert summary["other_recall_tma"].value == 1.0 and summary["other_recall_wsi"].value == 0.0
    assert summary["flag_rate_tma"].value == 0.25 and summary["flag_rate_wsi"].value == 0.0
    assert summary["flag_rate"].value == pytest.approx(1 / 6)
    assert summary["tma_ba"].value == pytest.approx((1 + 0.5 + 1) / 3)
    assert summary["wsi_ba"].value == pytest.approx((0 + 1 + 1) / 3)
    assert summary["other_recall_tma"].low == 1.0  # every resample's Other TMAs are all found
    assert summary["test_ba"].text().startswith(f"{summary['test_ba'].value:.3f} [")


def test_scored_frame_refuses_an_unpredicted_image_and_best_is_chosen_on_oof():
    truth = pd.DataFrame({"image_id": [1, 2], "label": ["CC", "EC"], "is_tma": [True, False]})
    with pytest.raises(ValueError, match=r"no prediction, e\.g\. \['2'\]"):
        scored_frame(pd.DataFrame({"image_id": ["1"], "label": ["CC"]}), truth)
    assert choose_best({"a": 0.7, "b": 0.8, "c": 0.8, "d": float("nan")}, ["a", "b", "c", "d"]) == "b"
    assert choose_best({"a": float("nan")}, ["a"]) is None


def test_site_predictability_is_chance_for_one_distribution_and_certain_for_two_apart():
    from ubc_ocean.benchmark.stats import site_predictability

    rng = np.random.default_rng(0)
    n_train, n_test, dim = 80, 120, 16
    is_test = np.r_[np.zeros(n_train, bool), np.ones(n_test, bool)]
    is_tma = rng.random(n_train + n_test) < 0.5
    same = rng.normal(0, 1, (n_train + n_test, dim))
    chance = site_predictability(same, is_test, is_tma)
    assert all(abs(value - 0.5) < 0.15 for value in chance.values()), chance
    from scipy.stats import norm

    # the test site shifted by d standard deviations along one axis: the best possible AUC is Phi(d / sqrt 2)
    d = 3.0
    apart = same + np.outer(is_test, np.r_[d, np.zeros(dim - 1)])
    plain = site_predictability(apart, is_test, is_tma)
    assert all(abs(value - norm.cdf(d / np.sqrt(2))) < 0.04 for value in plain.values()), plain
    only_wsis = site_predictability(apart, is_test, np.zeros_like(is_tma))
    assert np.isnan(only_wsis["tma"]) and only_wsis["all"] == only_wsis["wsi"]


def test_oof_test_rank_correlation_is_spearmans_over_the_configurations_that_ran():
    from ubc_ocean.benchmark.report import oof_test_rank_correlation

    results = pd.DataFrame({"oof_ba": [0.7, 0.8, 0.9, 0.6, 0.95], "test_ba": [0.5, 0.6, 0.7, 0.4, 0.1],
                            "status": ["ok", "ok", "ok", "ok", "failed: x"]})
    assert oof_test_rank_correlation(results) == pytest.approx(1.0)  # the failed one is left out
    results.loc[4, "status"] = "ok"  # highest OOF, lowest test: ranks 2,3,4,1,5 against 3,4,5,2,1, d^2 = 20
    assert oof_test_rank_correlation(results) == pytest.approx(1 - 6 * 20 / (5 * (25 - 1)))
    assert np.isnan(oof_test_rank_correlation(results.iloc[:2]))


def test_grouped_folds_add_a_column_and_their_own_rank_correlation():
    """Configurations trained again on grouped folds: the tables gain "OOF BA (grouped)" and the RESULT line
    oof_test_rank_grouped (here plain OOF ranks the three against test backwards, grouped OOF as test does);
    without grouped runs the column is absent and the figure n/a."""
    from ubc_ocean.benchmark.report import Outcome, markdown_table, result_line, results_frame
    from ubc_ocean.benchmark.stats import Estimate

    def outcomes(grouped: bool) -> list[Outcome]:
        made = []
        for name, oof, oof_grouped, test in (("a", 0.9, 0.6, 0.5), ("b", 0.8, 0.7, 0.6), ("c", 0.7, 0.8, 0.7)):
            outcome = Outcome(name, f"x-{name}", [], oof_ba=oof, seconds={"04_train": 2.0},
                              oof_ba_grouped=oof_grouped if grouped else None)
            outcome.scores = {"test_ba": Estimate(test, test - 0.1, test + 0.1)}
            made.append(outcome)
        return [*made, Outcome("d", "x-d", [], error="ValueError: x")]

    results = results_frame(outcomes(True), "a", "a")
    assert results["oof_ba_grouped"].tolist()[:3] == [0.6, 0.7, 0.8] and np.isnan(results["oof_ba_grouped"].iloc[3])
    assert result_line(results).endswith(" oof_test_rank=-1.000 oof_test_rank_grouped=1.000")
    lines = markdown_table(results).splitlines()
    assert lines[0].startswith("| configuration | OOF BA | OOF BA (grouped) | test BA [95% CI] |")
    assert lines[2].startswith("| **a** (baseline) | 0.900 | 0.600 | 0.500 [0.400, 0.600] |")
    assert len({line.count("|") for line in lines[:6]}) == 1  # the failed row has every cell too
    plain = results_frame(outcomes(False), "a", "a")
    assert "oof_ba_grouped" not in plain.columns and "(grouped)" not in markdown_table(plain)
    assert result_line(plain).endswith(" oof_test_rank=-1.000 oof_test_rank_grouped=n/a")
