"""Tumour masks -> tile tumour fractions (stage 01) -> a tile tumour scorer -> tile choice (stages 04-05).

Known answers: a red rectangle drawn on a mask gives each tile its overlap share; a scorer finds a planted
tumour direction; selection keeps the planted tiles; stage 05 cuts test bags down exactly as training did.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from tests.builders import LEAN, tiny_config, write_png
from ubc_ocean import embedding_cache, layout, tile_store
from ubc_ocean.config import ConfigError
from ubc_ocean.mil.predict import CheckpointEnsemble
from ubc_ocean.mil.tumour import TileChooser, TumourDataError, TumourScorer, kept_count, tile_targets
from ubc_ocean.sources import TEST, TRAIN, SlideSpec
from ubc_ocean.synthetic import render_slide
from ubc_ocean.tiling.masks import MaskError, read_tumour_map
from ubc_ocean.tiling.stage import tile_slide

CPU = torch.device("cpu")
RED, GREEN = (220, 30, 40), (20, 200, 30)
RECT = (100, 90, 420, 310)  # x0, y0, x1, y1 in image pixels: even, so exact on a half-size mask


def _overlap(x: int, y: int, extent: int) -> float:
    x0, y0, x1, y1 = RECT
    width = max(0, min(x + extent, x1) - max(x, x0))
    height = max(0, min(y + extent, y1) - max(y, y0))
    return width * height / extent**2


def _write_mask(path, size: tuple[int, int], scale: int = 2) -> None:
    """A mask at 1/``scale`` of the image: green stroma everywhere, the red :data:`RECT` of tumour."""
    width, height = size[0] // scale, size[1] // scale
    mask = np.zeros((height, width, 3), np.uint8)
    mask[:] = GREEN
    x0, y0, x1, y1 = (v // scale for v in RECT)
    mask[y0:y1, x0:x1] = RED
    write_png(path, mask)


def test_tile_tumour_fractions_match_the_masks_geometry_and_follow_the_mask(tmp_path):
    cfg = tiny_config(tmp_path, "tiling.max_tiles_per_slide=0")
    size = (640, 448)
    rgb, _ = render_slide("HGSC", *size, is_tma=False, hospital=1, seed=5)
    rgb[:] = np.maximum(rgb, 40)  # tissue-coloured everywhere: every cell is a tile
    spec = SlideSpec(TRAIN, "s1", write_png(tmp_path / "s1.png", rgb), is_tma=False, competition_scale=True)
    folder = layout.slide_tiles_dir(cfg, TRAIN, "s1")
    mask = layout.supplemental_mask_path(cfg, "s1")
    assert mask == tmp_path / "raw" / "train_supplemental_masks" / "s1.png"

    assert tile_slide(spec, cfg).status == "done"  # no mask yet: NaN everywhere, recorded as none
    index = tile_store.read_index(folder)
    assert index[tile_store.TUMOUR_FRACTION].isna().all() and tile_store.recorded_mask(folder) is None
    assert tile_slide(spec, cfg).status == "skipped"

    _write_mask(mask, size)  # a mask appears: the fractions are refreshed without tiling again
    tiles_before = sorted(p.name for p in folder.glob("*.jpg"))
    result = tile_slide(spec, cfg)
    assert result.status == "done" and "refreshed" in result.message
    assert sorted(p.name for p in folder.glob("*.jpg")) == tiles_before
    refreshed = tile_store.read_index(folder)

    shutil.rmtree(folder)  # tiled afresh with the mask there from the start: the same fractions
    assert tile_slide(spec, cfg).status == "done"
    index = tile_store.read_index(folder)
    pd.testing.assert_frame_equal(index, refreshed)
    assert tile_store.recorded_mask(folder) == {"file": "s1.png", "size": mask.stat().st_size}

    expected = np.array([_overlap(x, y, e) for x, y, e in zip(index.x, index.y, index.extent, strict=True)])
    fractions = index[tile_store.TUMOUR_FRACTION].to_numpy()
    assert np.allclose(fractions, expected, atol=1e-3)
    assert (expected == 1).sum() >= 3 and (expected == 0).sum() >= 5
    assert ((expected > 0.05) & (expected < 0.95)).sum() >= 4  # tiles straddling the edge: their overlap share
    assert tile_slide(spec, cfg).status == "skipped"

    mask.unlink()  # the mask goes: no fractions any more
    assert "refreshed" in tile_slide(spec, cfg).message
    assert tile_store.read_index(folder)[tile_store.TUMOUR_FRACTION].isna().all()


def test_an_older_index_loads_without_masks_and_a_bad_mask_is_named(tmp_path):
    pd.DataFrame({"file": ["0_0.jpg"], "x": [0], "y": [0], "extent": [64], "magnification": [20.0],
                  "tissue_fraction": [1.0], "blur_score": [3.0]}).to_csv(tmp_path / tile_store.INDEX_FILE, index=False)
    assert np.isnan(tile_store.read_index(tmp_path)[tile_store.TUMOUR_FRACTION]).all()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(MaskError, match=r"bad\.png"):
        read_tumour_map(tmp_path / "bad.png")


def test_a_large_mask_is_averaged_down_exactly(tmp_path):
    """A mask larger than the map's side is averaged in whole blocks: fractions stay exact area shares."""
    path = tmp_path / "m.png"
    _write_mask(path, (640, 448), scale=1)
    tumour_map = read_tumour_map(path, max_side=100)  # factor 7: 640 and 448 are not multiples of it
    assert tumour_map.factor == 7 and tumour_map.share.shape == (64, 92)
    boxes = [(x, y) for y in range(0, 448 - 64, 32) for x in range(0, 640 - 64, 32)]
    got = tumour_map.tile_fractions((640, 448), boxes, 64)
    expected = np.array([_overlap(x, y, 64) for x, y in boxes])
    assert np.abs(got - expected).max() < 0.12  # block edges blur the rectangle's by at most one block
    assert np.abs(got - expected).mean() < 0.02


# ----------------------------------------------------------------------------------------------- scorer


def _planted(n_slides: int, seed: int, dim: int = 24) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Slides of standard-normal tiles; tumour tiles (mask fraction 0.5-1) shifted 3 along one direction
    (Bayes AUC 0.98), ambiguous ones (0 < fraction < 0.5) half of them shifted."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).normal(size=dim)
    direction /= np.linalg.norm(direction)
    bags, fractions = [], []
    for _ in range(n_slides):
        n = int(rng.integers(60, 120))
        fraction = np.where(rng.random(n) < 0.35, rng.uniform(0.5, 1.0, n), 0.0)
        ambiguous = rng.random(n) < 0.1
        fraction[ambiguous] = rng.uniform(0.01, 0.49, ambiguous.sum())
        bag = rng.normal(size=(n, dim)) + 3.0 * np.outer((fraction >= 0.5) | (ambiguous & (rng.random(n) < 0.5)),
                                                         direction)
        bags.append(bag.astype(np.float16))
        fractions.append(fraction.astype(np.float32))
    return bags, fractions, direction


def test_scorer_finds_a_planted_tumour_direction_and_round_trips(tmp_path):
    bags, fractions, direction = _planted(8, seed=0)
    scorer = TumourScorer.fit(bags[:5], fractions[:5])
    auc, tiles = scorer.auc(bags[5:], fractions[5:])
    assert auc > 0.95 and tiles == sum(int(tile_targets(f)[0].sum()) for f in fractions[5:])
    cosine = scorer.coef / scorer.scale @ direction / np.linalg.norm(scorer.coef / scorer.scale)
    assert cosine > 0.8  # it learnt the planted direction itself
    chooser = TileChooser(scorer, "select", 0.5, 8)
    path = chooser.save(tmp_path / "scorer.json")
    again = TileChooser.load(path)
    assert again.record() == chooser.record()
    assert np.allclose(again.scorer.score(bags[6]), scorer.score(bags[6]))
    with pytest.raises(TumourDataError, match="needs both"):
        TumourScorer.fit(bags[:2], [np.zeros_like(f) for f in fractions[:2]])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bad\.json"):
        TileChooser.load(tmp_path / "bad.json")


def test_select_keeps_the_planted_tumour_tiles_and_weight_draws_mostly_them():
    bags, fractions, _ = _planted(6, seed=1)
    scorer = TumourScorer.fit(bags, fractions)
    rng = np.random.default_rng(3)
    planted = np.zeros(40, bool)
    planted[rng.choice(40, 10, replace=False)] = True
    direction = scorer.coef / scorer.scale / np.linalg.norm(scorer.coef / scorer.scale)
    bag = torch.from_numpy((rng.normal(size=(40, 24)) + 4.0 * np.outer(planted, direction)).astype(np.float32))

    def positions(rows: torch.Tensor) -> np.ndarray:
        return torch.cdist(rows, bag).argmin(1).numpy()

    chooser = TileChooser(scorer, "select", 0.25, 8)
    kept = chooser.select(bag)
    positions_kept = positions(kept)
    assert set(positions_kept) == set(np.flatnonzero(planted)) and (np.diff(positions_kept) > 0).all()  # in order
    assert chooser.select(bag[:5]).shape[0] == 5  # fewer than min_tiles: all kept
    assert [kept_count(n, 0.5, 8) for n in (3, 8, 10, 17, 100)] == [3, 8, 8, 9, 50]
    assert kept_count(10, 1.0, 1) == 10

    weight = TileChooser(scorer, "weight", 0.25, 8)
    scores = scorer.score(bag)
    draws = [weight.draw(bag, scores, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(d.shape[0] == 10 for d in draws)
    shares = [planted[positions(d)].mean() for d in draws]
    # random, but led by tumour: a uniform draw would hold 25% planted tiles
    assert np.mean(shares) > 0.5 and len({tuple(positions(d)) for d in draws}) > 1
    again = weight.draw(bag, scores, torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[0])
    selected, draw = weight.training_bags([bag])
    assert torch.equal(selected[0], chooser.select(bag)) and draw(0, torch.Generator().manual_seed(0)).shape[0] == 10
    assert TileChooser(scorer, "select", 0.25, 8).training_bags([bag])[1] is None


# --------------------------------------------------------------------------------- stages 01-05 end to end


def _mask_training_wsis(cfg) -> list[str]:
    """Every training WSI but the first gets a mask: its left 40% red (tumour), the rest green."""
    train = pd.read_csv(layout.raw_path(cfg, "train_csv"), dtype={"image_id": str})
    wsis = train[~train["is_tma"].astype(bool)]
    masked = []
    for row in wsis.iloc[1:].itertuples():
        width, height = int(row.image_width) // 4, int(row.image_height) // 4
        mask = np.zeros((height, width, 3), np.uint8)
        mask[:] = GREEN
        mask[:, : int(0.4 * width)] = RED
        write_png(layout.supplemental_mask_path(cfg, row.image_id), mask)
        masked.append(row.image_id)
    return masked


def test_stages_train_and_apply_the_tumour_scorer_end_to_end(pipeline, tmp_path, single_torch_thread):
    """On a copy of the shared tiny pipeline (stages 00-05, no masks): masks added later, stage 01 refreshes
    the fractions, stage 03 re-embeds those slides, stage 04 trains the scorer and stage 05 applies it."""
    from ubc_ocean.external.stage import run as merge
    from ubc_ocean.features.stage import run as embed
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train
    from ubc_ocean.tiling.stage import run as tile

    root = tmp_path / "data"
    shutil.copytree(pipeline, root)
    on = ("tumour.scorer=true", "tumour.keep_fraction=0.5", "tumour.min_tiles=4")
    cfg = tiny_config(root, *LEAN, *on)
    before = layout.model_dir(cfg, "abmil").read_completion()
    with pytest.raises(ConfigError, match="train_supplemental_masks"):  # no mask anywhere: refused before training
        train(cfg)
    assert layout.model_dir(cfg, "abmil").read_completion() == before
    masked = _mask_training_wsis(cfg)
    assert tile(cfg)["done"] == len(masked)  # the fractions refreshed, nothing tiled again
    merge(cfg)
    embed(cfg)
    embeddings = layout.embeddings_root(cfg)
    for image_id in masked[:2]:  # stage 03 carries stage 01's fractions, row for row
        features, coords, _ = embedding_cache.read_embeddings(layout.embedding_path(embeddings, TRAIN, image_id))
        index = tile_store.read_index(layout.slide_tiles_dir(cfg, TRAIN, image_id)).set_index(["x", "y"])
        expected = index.loc[list(map(tuple, coords)), tile_store.TUMOUR_FRACTION].to_numpy(np.float32)
        got = embedding_cache.read_tumour_fraction(layout.embedding_path(embeddings, TRAIN, image_id))
        assert got is not None and np.array_equal(got, expected) and len(got) == len(features)
        assert (got == 0).any() and (got >= 0.5).any()
    train_csv = pd.read_csv(layout.raw_path(cfg, "train_csv"), dtype={"image_id": str})
    unmasked = sorted(set(train_csv["image_id"]) - set(masked))
    assert embedding_cache.read_tumour_fraction(layout.embedding_path(embeddings, TRAIN, unmasked[0])) is None

    metrics = train(cfg)["abmil"]
    report = metrics["tumour_scorer"]
    assert report["masked_slides"] == len(masked) and report["mode"] == "select"
    assert len(report["folds"]) == 2 and all(row["train_slides"] > 0 for row in report["folds"])
    assert all(row["tile_auc"] is None or 0 <= row["tile_auc"] <= 1 for row in report["folds"])
    model = layout.model_dir(cfg, "abmil")
    record = model.read_completion()
    assert record["tumour"] == {"file": "tumour_scorer.json", "mode": "select", "keep_fraction": 0.5, "min_tiles": 4}
    assert json.loads(model.metrics.read_text())["tumour_scorer"] == report

    infer(cfg)  # stage 05 cuts each test bag down with the saved scorer before the checkpoints score it
    chooser = TileChooser.load(model.tumour_scorer)
    predictions = model.read_test_predictions().set_index("image_id")
    ensemble = CheckpointEnsemble(model.checkpoints(), CPU, "fp32", int(cfg.mil.max_instances_predict))
    image_id = predictions.index[0]
    features, _, _ = embedding_cache.read_embeddings(layout.embedding_path(embeddings, TEST, image_id))
    bag = torch.from_numpy(features)
    classes = list(cfg.data.classes)
    selected = ensemble.predict([chooser.select(bag)])[classes].to_numpy()[0]
    whole = ensemble.predict([bag])[classes].to_numpy()[0]
    assert np.allclose(predictions.loc[image_id, classes].to_numpy(float), selected, atol=1e-5)
    assert chooser.select(bag).shape[0] < bag.shape[0] and not np.allclose(selected, whole, atol=1e-6)

    weighted = tiny_config(root, *LEAN, *on, "tumour.mode=weight", "experiment=weighted")
    metrics = train(weighted)["abmil"]
    assert metrics["tumour_scorer"]["mode"] == "weight"
    assert layout.model_dir(weighted, "abmil").read_completion()["tumour"]["mode"] == "weight"
