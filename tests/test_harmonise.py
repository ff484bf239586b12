"""Training-side ComBat harmonisation (``mil.harmonise``, ``ubc_ocean.mil.harmonise``): known answers on planted
batch shifts, the tile map against neuroCombat's own output, a planted confound, and stage 04 end to end."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from tests.builders import LEAN, tiny_config
from ubc_ocean import layout
from ubc_ocean.config import ConfigError
from ubc_ocean.mil.harmonise import HarmoniseError, Harmoniser, batch_names, fit_combat, require_column

BATCHES = ("h0", "h1", "h2")


def _planted(seed: int = 0, dim: int = 32, noise: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Slide means for 3 batches x 2 classes, unbalanced (h0 8 A / 4 B, h1 4 / 8, h2 6 / 6) so that the batch
    shifts (norm 3) bias the raw class difference (norm 2); each slide adds N(0, noise) per feature."""
    rng = np.random.default_rng(seed)
    shifts = rng.normal(size=(3, dim))
    shifts *= 3 / np.linalg.norm(shifts, axis=1, keepdims=True)
    diff = rng.normal(size=dim)
    diff *= 2 / np.linalg.norm(diff)
    counts = {"h0": (8, 4), "h1": (4, 8), "h2": (6, 6)}
    means, batches, labels = [], [], []
    for k, batch in enumerate(BATCHES):
        for c, label in enumerate("AB"):
            for _ in range(counts[batch][c]):
                means.append(shifts[k] + c * diff + rng.normal(0, noise, dim))
                batches.append(batch)
                labels.append(label)
    return np.array(means), np.array(batches), np.array(labels), {"shifts": shifts, "diff": diff}


def _batch_deviation(x: np.ndarray, batches: np.ndarray, labels: np.ndarray) -> float:
    """The largest distance of a batch's class mean from that class's mean over all batches."""
    return max(float(np.linalg.norm(x[(labels == c) & (batches == b)].mean(0) - x[labels == c].mean(0)))
               for c in "AB" for b in BATCHES)


def _class_difference_error(x: np.ndarray, labels: np.ndarray, diff: np.ndarray) -> float:
    return float(np.linalg.norm(x[labels == "B"].mean(0) - x[labels == "A"].mean(0) - diff))


@pytest.mark.parametrize(("mean_only", "left"), [(True, 0.3), (False, 0.15)])
def test_planted_batch_shifts_are_removed_and_the_class_difference_kept(mean_only, left):
    """Measured (seed 0): the batch deviation 3.24 falls to 0.61 mean only (0.19 of it) and to 0.38 with location
    and scale (0.12); the raw class difference is off the planted one by 1.11, after ComBat by 0.38 / 0.35, the
    noise floor (the noise alone: 0.33). Mean only leaves more because neuroCombat's (and sva's) mean-only prior
    shrinks each batch's shift towards the mean over features as if the batch had one slide."""
    means, batches, labels, planted = _planted()
    out = fit_combat(means, batches, labels, mean_only).apply(means)
    before = _batch_deviation(means, batches, labels)
    assert before > 2.5
    assert _batch_deviation(out, batches, labels) < left * before
    assert _class_difference_error(means, labels, planted["diff"]) > 0.8  # the confounded raw difference
    assert _class_difference_error(out, labels, planted["diff"]) < 0.45
    assert abs(np.linalg.norm(out[labels == "B"].mean(0) - out[labels == "A"].mean(0)) - 2) < 0.3  # kept, not shrunk


def test_the_mean_only_shift_is_the_planted_one_and_what_neurocombat_does_to_the_slide_means():
    means, batches, labels, planted = _planted()
    fitted = fit_combat(means, batches, labels, mean_only=True)
    assert np.allclose(fitted.apply(means), fitted.harmonised, atol=1e-9)  # derived map == neuroCombat's output
    assert np.array_equal(fitted.scale, np.ones_like(means))
    weights = np.array([(batches == b).mean() for b in BATCHES])
    centred = planted["shifts"] - weights @ planted["shifts"]  # ComBat keeps the slides' pooled mean
    for k, batch in enumerate(BATCHES):
        rows = fitted.offset[batches == batch]
        assert np.allclose(rows, rows[0])  # one shift per batch, the same for both labels
        cosine = -rows[0] @ centred[k] / (np.linalg.norm(rows[0]) * np.linalg.norm(centred[k]))
        assert cosine > 0.97  # measured 0.99-1.00
        assert 0.6 < np.linalg.norm(rows[0]) / np.linalg.norm(centred[k]) < 1.0  # shrunk by the prior (0.8-0.9)


def test_location_scale_map_matches_neurocombat_and_a_one_slide_batch_still_counts():
    means, batches, labels, _ = _planted()
    fitted = fit_combat(means, batches, labels, mean_only=False)
    assert np.allclose(fitted.apply(means), fitted.harmonised, atol=1e-9)
    assert not np.allclose(fitted.scale, 1.0)
    # a fourth batch of one slide: mean only, it gets its own shift. Location-scale has no variance for it:
    # neuroCombat's output is then NaN for every slide (its NaN estimates for that batch enter every slide's
    # product with the batch design), but its estimates for the other batches are finite, and the map read from
    # them moves the other slides as ComBat without the lone slide does (within 10% of the move); the lone slide
    # gets its mean-only shift, scale 1
    lone = np.vstack([means, means[0] + 1.5])
    lone_batches, lone_labels = np.append(batches, "h3"), np.append(labels, "A")
    shift_only = fit_combat(lone, lone_batches, lone_labels, mean_only=True)
    assert np.allclose(shift_only.apply(lone), shift_only.harmonised, atol=1e-9)
    assert np.linalg.norm(shift_only.offset[-1]) > 1.0
    with np.errstate(all="ignore"):
        mapped = fit_combat(lone, lone_batches, lone_labels, mean_only=False)
    assert np.isnan(mapped.harmonised).all()
    moved = np.linalg.norm(fitted.harmonised - means, axis=1).mean()  # 2.46
    assert np.linalg.norm(mapped.apply(lone)[:-1] - fitted.harmonised, axis=1).max() < 0.1 * moved  # 0.22
    assert np.array_equal(mapped.scale[-1], np.ones(lone.shape[1]))
    assert np.allclose(mapped.offset[-1], shift_only.offset[-1])


def _frame(slide_ids, labels, batches, source="train") -> pd.DataFrame:
    return pd.DataFrame({"slide_id": slide_ids, "label": labels, "source": source, "hospital": batches})


def test_tiles_move_as_the_slide_means_do_and_validation_bags_are_untouched():
    means, batches, labels, _ = _planted(dim=8)
    rng = np.random.default_rng(1)
    ids = [f"train/{i}" for i in range(len(means))]
    bags = {s: torch.from_numpy((m + rng.normal(0, 1, (int(rng.integers(5, 20)), 8))).astype(np.float32))
            for s, m in zip(ids, means, strict=True)}
    originals = {s: bag.clone() for s, bag in bags.items()}
    table = _frame(ids, labels, batches)
    train = table.iloc[:-4]  # the last four slides validate this fold: never adjusted, never estimated from
    bag_means = np.stack([bags[s].double().mean(0).numpy() for s in train["slide_id"]])
    listed = [bags[s] for s in train["slide_id"]]

    def draw(index: int, generator: torch.Generator) -> torch.Tensor:  # as the tumour scorer's weight mode
        return listed[index][:3]

    for mean_only in (True, False):
        harmoniser = Harmoniser("hospital", mean_only, dict(zip(ids, batches, strict=True)))
        adjusted, adjusted_draw = harmoniser.fold(0, train, bags, listed, draw)
        expected = fit_combat(bag_means, batches[:-4], labels[:-4], mean_only).harmonised
        assert np.allclose(np.stack([b.double().mean(0).numpy() for b in adjusted]), expected, atol=1e-4)
        fitted = fit_combat(bag_means, batches[:-4], labels[:-4], mean_only)
        first = bags[train["slide_id"].iloc[0]][:3].double().numpy()
        assert np.allclose(adjusted_draw(0, torch.Generator()).double().numpy(),
                           fitted.scale[0] * first + fitted.offset[0], atol=1e-4)  # the draw is mapped too
        assert [r["status"] for r in harmoniser.rows] == ["adjusted"] * 3
    assert all(torch.equal(bags[s], originals[s]) for s in ids)


def test_a_batch_confounded_with_a_label_is_refused_and_the_fold_trains_unadjusted(caplog):
    means, batches, labels, _ = _planted(dim=8)
    confounded = labels.copy()
    confounded[batches == "h2"] = "C"  # class C exactly batch h2: neither effect can be told from the other
    with pytest.raises(HarmoniseError, match="cannot be told apart"):
        fit_combat(means, batches, confounded, mean_only=True)
    with pytest.raises(HarmoniseError, match="no residual"):
        fit_combat(means[[0, 1, 8]], ["h0", "h0", "h1"], ["A", "B", "A"], mean_only=True)
    ids = [f"train/{i}" for i in range(len(means))]
    bags = {s: torch.from_numpy(np.tile(m, (3, 1)).astype(np.float32)) for s, m in zip(ids, means, strict=True)}
    harmoniser = Harmoniser("hospital", True, dict(zip(ids, batches, strict=True)))
    train = _frame(ids, confounded, batches)
    listed = [bags[s] for s in ids]
    adjusted, draw = harmoniser.fold(2, train, bags, listed, None)
    assert draw is None and all(a is b for a, b in zip(adjusted, listed, strict=True))
    assert {r["status"].split(":")[0] for r in harmoniser.rows} == {"skipped"} and "fold 2 trains unharmonised" \
        in caplog.text


def test_batches_fall_back_to_the_source_where_the_column_is_empty():
    table = pd.DataFrame({"source": ["train", "train", "synthetic_tiff", "train"],
                          "hospital": [1.0, 0.0, np.nan, " "]})
    assert batch_names(table, "hospital").tolist() == ["1", "0", "synthetic_tiff", "train"]


def test_harmonise_without_neurocombat_is_a_config_error_naming_the_extra(monkeypatch):
    table = pd.DataFrame({"slide_id": ["train/1"], "source": ["train"], "hospital": [0]})
    on = {"harmonise": "combat", "harmonise_by": "hospital", "bag_standardise": False}
    require_column([on], table)
    monkeypatch.setitem(sys.modules, "neuroCombat", None)  # as if not installed
    require_column([{**on, "harmonise": "none"}], table)  # off: not needed
    with pytest.raises(ConfigError, match=r"neuroCombat.*ubc-ocean\[train\]"):
        require_column([on], table)


# ---------------------------------------------------------------------------------------- planted confound


def _confound_data(seed: int, shift: float = 3.0, dim: int = 8, tiles: int = 20) -> tuple:
    """Bags whose hospital shift (``shift`` along feature 0) goes with the label in training (h0: 54 A / 6 B,
    h1: 6 / 54, h2 unshifted 30 / 30); the label moves feature 1 by 1. Held out: 15 slides per class from each
    hospital, so the shift says nothing of the label there."""
    rng = np.random.default_rng(seed)
    u, v = np.eye(dim)[0], np.eye(dim)[1]
    plan = {"h0": (shift * u, (54, 6)), "h1": (-shift * u, (6, 54)), "h2": (0 * u, (30, 30))}

    def bag(label: int, offset: np.ndarray) -> torch.Tensor:
        centre = label * v + offset + rng.normal(0, 0.5, dim)
        return torch.from_numpy((centre + rng.normal(0, 1, (tiles, dim))).astype(np.float32))

    rows, bags = [], {}
    for hospital, (offset, counts) in plan.items():
        for label, count in enumerate(counts):
            for i in range(count):
                slide = f"train/{hospital}_{label}_{i}"
                bags[slide] = bag(label, offset)
                rows.append({"slide_id": slide, "label": "AB"[label], "source": "train", "hospital": hospital})
    held_out = [(bag(label, offset), label) for offset, _ in plan.values() for label in (0, 1) for _ in range(15)]
    return pd.DataFrame(rows), bags, held_out, {hospital: offset for hospital, (offset, _) in plan.items()}


def _held_out_ba(train: pd.DataFrame, train_bags: list[torch.Tensor], held_out: list) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    features = np.stack([b.mean(0).numpy() for b in train_bags])
    head = LogisticRegression(max_iter=1000).fit(features, (train["label"] == "B").astype(int))
    test = np.stack([b.mean(0).numpy() for b, _ in held_out])
    return float(balanced_accuracy_score([y for _, y in held_out], head.predict(test)))


def test_a_planted_confound_location_scale_combat_helps_a_linear_head_and_mean_only_does_not():
    """A linear head on bag means, trained on ComBat-adjusted training bags, scored on unadjusted held-out bags
    (as validation and test slides are). Measured, mean of seeds 0-7: unadjusted 0.73, location-scale ComBat
    0.79 (what subtracting the true shifts gives: 0.79), mean-only ComBat 0.65: WORSE than nothing. The
    mean-only prior of neuroCombat (and of R's sva) shrinks each batch's shift as for a batch of one slide,
    leaving about a tenth of a shift that sits in one feature; the head still tells the hospitals apart by it,
    with a larger weight since the shift is smaller, and the unadjusted held-out slides carry the whole shift.
    So the test asserts what holds: location-scale helps, about as much as the true shifts would, and mean
    only does not."""
    scores: dict[str, list[float]] = {"none": [], "mean_only": [], "location_scale": [], "true_shifts": []}
    for seed in range(8):
        train, bags, held_out, offsets = _confound_data(seed)
        listed = [bags[s] for s in train["slide_id"]]
        scores["none"].append(_held_out_ba(train, listed, held_out))
        hospitals = dict(zip(train["slide_id"], train["hospital"], strict=True))
        for name, mean_only in (("mean_only", True), ("location_scale", False)):
            adjusted, _ = Harmoniser("hospital", mean_only, hospitals).fold(0, train, bags, listed, None)
            scores[name].append(_held_out_ba(train, adjusted, held_out))
        true = [bag - torch.from_numpy(offsets[h].astype(np.float32))
                for bag, h in zip(listed, train["hospital"], strict=True)]
        scores["true_shifts"].append(_held_out_ba(train, true, held_out))
    mean = {name: float(np.mean(values)) for name, values in scores.items()}
    assert mean["location_scale"] > mean["none"] + 0.04, mean
    assert abs(mean["location_scale"] - mean["true_shifts"]) < 0.03, mean
    assert mean["mean_only"] < mean["none"] < mean["location_scale"], mean


# ------------------------------------------------------------------------------------------------ stage 04


def test_stage_04_harmonises_by_the_hospital_column_stage_02_carries(pipeline, tmp_path, single_torch_thread):
    """train.csv's hospital column reaches the manifest (external slides: empty, batched by their source);
    stage 04 with ``mil.harmonise=combat`` records the method and writes the per-fold shifts. Without the
    column it is a config error naming the columns there are, before any file is written."""
    from ubc_ocean.external.stage import run as merge
    from ubc_ocean.mil.stage import run as train_stage

    base = tiny_config(pipeline, *LEAN)
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copytree(base.paths.processed, tmp_path / "processed")
    paths = (f"paths.raw={raw}", f"paths.processed={tmp_path / 'processed'}", f"paths.runs={tmp_path / 'runs'}")
    on = ("mil.harmonise=combat",)
    with pytest.raises(ConfigError, match=r"mil.harmonise_by.*'hospital'.*columns: slide_id, source"):
        train_stage(tiny_config(pipeline, *LEAN, *on, *paths[1:]))
    assert not (tmp_path / "runs" / "demo" / "abmil").exists()

    train_csv = pd.read_csv(layout.raw_path(base, "train_csv"), dtype={"image_id": str})
    train_csv["hospital"] = np.arange(len(train_csv)) % 3
    train_csv.to_csv(raw / base.data.train_csv, index=False)
    cfg = tiny_config(pipeline, *LEAN, *on, *paths)
    merge(cfg)
    table = layout.read_training_table(cfg)
    competition = table["source"] == "train"
    assert set(table.loc[competition, "hospital"].astype(int)) == {0, 1, 2}
    assert table.loc[~competition, "hospital"].isna().all()

    train_stage(cfg)
    model = layout.model_dir(cfg, "abmil")
    record = model.read_completion()
    assert record["harmonise"]["method"] == "combat" and record["harmonise"]["by"] == "hospital"
    assert record["harmonise"]["mean_only"] is False and record["harmonise"]["file"] == model.harmonisation.name
    report = pd.read_csv(model.harmonisation, dtype={"batch": str})
    assert sorted(report["fold"].unique()) == [0, 1]
    for fold, rows in report.groupby("fold"):
        expected = batch_names(table[table["fold"] != fold], "hospital").value_counts()
        assert dict(zip(rows["batch"], rows["slides"], strict=True)) == expected.to_dict()
    assert set(record["harmonise"]["folds_adjusted"]) == set(report.loc[report["status"] == "adjusted", "fold"])
    adjusted = report[report["status"] == "adjusted"]
    assert len(adjusted) and (adjusted["shift_norm"] > 0).all() and (adjusted["spread_norm"] > 0).all()
    metrics = json.loads(model.metrics.read_text())
    assert metrics["training"]["harmonise"] == "combat"


def test_combat_batches_by_stain_cluster_where_no_hospital_is_named(pipeline, tmp_path, single_torch_thread):
    """The real train.csv names no hospital: ``mil.harmonise_by=stain_cluster`` makes stage 02 cluster the
    competition slides' stain vectors into a manifest column (external slides empty: batched by their source),
    with plain folds, and stage 04 batches ComBat by it."""
    from ubc_ocean.config.schema import STAIN_CLUSTER
    from ubc_ocean.external.stage import run as merge
    from ubc_ocean.mil.stage import run as train_stage

    base = tiny_config(pipeline, *LEAN)
    shutil.copytree(base.paths.processed, tmp_path / "processed")
    cfg = tiny_config(pipeline, *LEAN, "mil.harmonise=combat", f"mil.harmonise_by={STAIN_CLUSTER}",
                      "folds.stain_clusters=3", f"paths.processed={tmp_path / 'processed'}",
                      f"paths.runs={tmp_path / 'runs'}")
    assert cfg.folds.group_by is None
    merge(cfg)
    table = layout.read_training_table(cfg)
    competition = table["provenance"].eq("competition")
    assert table.loc[competition, STAIN_CLUSTER].str.startswith(f"{STAIN_CLUSTER}:").all()
    assert table.loc[~competition & ~table["source"].eq("train"), STAIN_CLUSTER].isna().all()
    assert table.loc[competition, STAIN_CLUSTER].nunique() == 3 and layout.stain_vectors_path(cfg).is_file()
    train_stage(cfg)
    report = pd.read_csv(layout.model_dir(cfg, "abmil").harmonisation, dtype={"batch": str})
    assert report["batch"].str.startswith(f"{STAIN_CLUSTER}:").any()
    assert layout.model_dir(cfg, "abmil").read_completion()["harmonise"]["by"] == STAIN_CLUSTER
