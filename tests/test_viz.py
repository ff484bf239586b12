"""Pictures of a run: heatmaps land on the right pixels, every model's tile relevance, the CV figures' numbers,
scripts/heatmaps.py on a tiny trained run, and the HTML report as headless Chromium renders it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from tests.builders import TINY_RUN_OVERRIDES, read_rgb, run_script, small_mil_model, tiny_overrides
from ubc_ocean.viz import attention_heatmap, instance_relevance
from ubc_ocean.viz.overlay import heat_grid, ranked_tiles, tile_rectangles

matplotlib.use("Agg")

GREY = 128


def _jet(value: float) -> np.ndarray:
    return np.asarray(matplotlib.colormaps["jet"](value)[:3]) * 255.0


def test_planted_values_land_on_their_tiles_pixels():
    """A 2000 x 1000 slide seen 200 x 100 (scale 0.1), 200-px tiles -> 20-px squares: the tile given the top
    value is tinted jet's red exactly over its square, the bottom one blue, and nothing else changes."""
    view = np.full((100, 200, 3), GREY, np.uint8)
    coords = np.array([[0, 0], [400, 200], [1000, 600]])
    out = attention_heatmap(view, coords, np.array([0.0, 3.0, 1.5]), extent=200, slide_size=(2000, 1000), alpha=0.5)
    hot = np.round(0.5 * GREY + 0.5 * _jet(1.0))
    cold = np.round(0.5 * GREY + 0.5 * _jet(0.0))
    middle = np.round(0.5 * GREY + 0.5 * _jet(0.5))
    assert (out[20:40, 40:60] == hot).all() and (out[0:20, 0:20] == cold).all()
    assert (out[60:80, 100:120] == middle).all()
    tinted = np.zeros(out.shape[:2], bool)
    for y0, x0 in ((20, 40), (0, 0), (60, 100)):
        tinted[y0:y0 + 20, x0:x0 + 20] = True
    assert (out[~tinted] == GREY).all()
    # the hottest pixels are exactly the planted tile's square
    redness = out[..., 0].astype(int) - out[..., 2].astype(int)
    ys, xs = np.nonzero(redness == redness.max())
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 39, 40, 59)


def test_tile_strip_puts_each_picture_in_its_slot_at_one_size_with_white_between():
    from ubc_ocean.viz.slide import tile_strip

    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 200
    blue = np.zeros((16, 16, 4), np.uint8)  # another size, with alpha: resized, alpha dropped
    blue[..., 2] = 180
    strip = tile_strip([red, None, blue], size=8, gap=2)
    assert strip.shape == (8, 3 * 8 + 2 * 2, 3) and strip.dtype == np.uint8
    assert (strip[:, :8] == [200, 0, 0]).all() and (strip[:, 20:28] == [0, 0, 180]).all()
    assert (strip[:, 8:20] == 255).all()  # the gap, the empty slot and the next gap


def test_tile_rectangles_clip_and_never_vanish():
    rects = tile_rectangles(np.array([[0, 0], [1990, 990]]), 5, (2000, 1000), (200, 100))
    assert rects.tolist() == [[0, 0, 1, 1], [199, 99, 200, 100]]
    grid = heat_grid(np.array([[0, 0]]), np.array([0.7]), 1000, (2000, 1000), (200, 100))
    assert np.isclose(grid[:100, :100], 0.7).all() and np.isnan(grid[:, 100:]).all()


def test_ranked_tiles_split_small_bags():
    top, bottom = ranked_tiles(np.array([0.1, 0.9, 0.5, 0.3, 0.7]), 3)
    assert top.tolist() == [1, 4] and bottom.tolist() == [0, 3]
    top, bottom = ranked_tiles(np.array([0.4]), 3)
    assert top.tolist() == [0] and bottom.tolist() == []


def test_gradient_x_input_known_answer():
    """Mean-pool made linear (identity encoder, ReLU kept active, head reading feature 0): the logit is
    mean_i x_i0 + const, so gradient x input of instance i is exactly x_i0 / N."""
    model = small_mil_model("meanpool", hidden_dim=32).eval()
    with torch.no_grad():
        for layer in (model.instance_encoder[0], model.classifier[0]):
            layer.weight.copy_(torch.eye(32))
        model.instance_encoder[0].bias.zero_()
        model.classifier[0].bias.fill_(100.0)
        model.classifier[3].weight.zero_()
        model.classifier[3].weight[1, 0] = 1.0
        model.classifier[3].bias.copy_(torch.tensor([0.0, 50.0, 0.0]))  # class 1 predicted
    bag = torch.zeros(5, 32)
    bag[:, 0] = torch.tensor([0.0, 2.0, 0.5, 8.0, 1.0])
    bag[:, 1:] = 3.0  # other features do not reach the logit
    rel = instance_relevance(model, bag)
    assert rel.method == "gradient x input" and rel.predicted == 1
    np.testing.assert_allclose(rel.values, bag[:, 0].numpy() / 5, atol=1e-6)


@pytest.mark.parametrize("name, method", [("abmil", "attention"), ("dsmil", "class attention"),
                                          ("chowder", "instance score"), ("transmil", "gradient x input")])
def test_every_model_explains_each_tile(name, method):
    model = small_mil_model(name)
    bag = torch.randn(11, 32)
    bag[4] = 0.0
    rel = instance_relevance(model, bag)
    assert rel.method == method and rel.values.shape == (11,) and np.isfinite(rel.values).all()
    assert rel.predicted == int(np.argmax(rel.probs)) and np.isclose(rel.probs.sum(), 1.0, atol=1e-5)
    if name == "transmil":  # a zero tile contributes nothing to gradient x input
        assert rel.values[4] == 0.0 and np.abs(rel.values).max() > 0
    if method.endswith("attention"):
        assert np.isclose(rel.values.sum(), 1.0, atol=1e-5)


def test_bootstrap_interval_and_reliability():
    from ubc_ocean.viz.cv import bootstrap_interval, reliability

    classes = ["A", "B"]
    truth = np.array(["A"] * 10 + ["B"] * 10)
    assert bootstrap_interval(truth, truth, classes, n_boot=200) == (1.0, 1.0)
    predicted = truth.copy()
    predicted[:5] = "B"  # recall A 0.5, B 1.0: BA 0.75
    low, high = bootstrap_interval(truth, predicted, classes, n_boot=500)
    assert low < 0.75 < high
    per_slide = pd.DataFrame({"A": [0.95, 0.85, 0.55], "B": [0.05, 0.15, 0.45], "label": ["A", "B", "A"]})
    table = reliability(per_slide, classes, bins=10)
    assert table.loc[9, "slides"] == 1 and table.loc[9, "accuracy"] == 1.0
    assert table.loc[8, "accuracy"] == 0.0 and table.loc[5, "accuracy"] == 1.0 and np.isnan(table.loc[0, "accuracy"])


def test_cv_figure_draws_loco_roc_when_that_run_exists():
    from ubc_ocean.viz.cv import cv_figure

    classes = ["A", "B"]
    per_slide = pd.DataFrame({"A": [0.9, 0.2, 0.6, 0.3], "B": [0.1, 0.8, 0.4, 0.7], "label": ["A", "B", "B", "B"],
                              "is_tma": [False, False, True, True], "score_entropy": [0.3, 0.5, 0.9, 0.6]})
    loco = pd.DataFrame({"held_out": "A", "score": "entropy", "unknown": [0, 0, 1, 1], "value": [0.1, 0.4, 0.3, 0.9]})
    without = cv_figure("m", per_slide, classes, "entropy", 0.8)
    with_roc = cv_figure("m", per_slide, classes, "entropy", 0.8, loco)
    assert len(without.axes) == 5 and len(with_roc.axes) == 6
    (curve,) = [line for line in with_roc.axes[5].lines if line.get_label().startswith("A")]
    assert curve.get_label() == "A (0.75)"  # AUROC of the planted scores
    assert any(line.get_xdata()[0] == 0.8 for line in with_roc.axes[4].lines)  # the threshold is drawn


def test_loco_auroc_from_scores():
    from ubc_ocean.mil.loco import auroc_table

    scores = pd.DataFrame({"model": "m", "held_out": "A", "score": ["s"] * 4 + ["t"] * 4,
                           "slide_id": list("wxyz") * 2, "unknown": [0, 0, 1, 1] * 2,
                           "value": [0.1, 0.2, 0.8, 0.9, 0.9, 0.8, 0.2, 0.1]})
    table = auroc_table(scores).set_index("score")["auroc"]
    assert table.to_dict() == {"s": 1.0, "t": 0.0}


def test_nearest_bags():
    from ubc_ocean.viz.neighbours import nearest

    bank = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    index, similarity = nearest(np.array([[2.0, 0.1]]), bank, k=2)
    assert index.tolist() == [[0, 2]] and similarity[0, 0] > similarity[0, 1]


# ------------------------------------------------------------------------------------- on a trained run


def _test_ids(cfg) -> list[str]:
    from ubc_ocean.sources import read_test_csv

    return read_test_csv(cfg)["image_id"].astype(str).tolist()


def test_heatmaps_script_writes_pictures_of_tissue_and_heat(tiny_run, monkeypatch, capsys):
    """scripts/heatmaps.py on two test slides and one training slide: one PNG each, showing tissue (pink /
    purple pixels) and the heat colours (saturated jet red and blue) of the overlay."""
    data_root = Path(tiny_run.paths.data_root)
    train_id = pd.read_csv(Path(tiny_run.paths.raw) / "train.csv").image_id[0]
    slides = [*_test_ids(tiny_run)[:2], f"train/{train_id}"]
    code, _, err = run_script("heatmaps.py", "--config", "configs/demo.yaml", *tiny_overrides(data_root),
                              *TINY_RUN_OVERRIDES, "--slides", ",".join(slides), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err[-3000:]
    from ubc_ocean import layout
    from ubc_ocean.viz.report import heatmaps

    paths = sorted(layout.heatmap_path(tiny_run, layout.find_slide(tiny_run, s).slide_id) for s in slides)
    assert sorted(p for p in (layout.run_dir(tiny_run) / "heatmaps").glob("*.png")) == paths
    assert layout.HEATMAPS_DIR not in {folder.name for folder in layout.model_folders(tiny_run)}  # not a model
    for path in paths:
        rgb = read_rgb(path)[..., :3].astype(int)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        tissue = (r > 120) & (b > 120) & (g < r - 30)  # H&E pink / purple
        greenish = (g > r + 30) & (g > b + 20)  # jet's middle over tissue: only the overlay makes it
        assert tissue.sum() > 500 and greenish.sum() > 100, (path.name, tissue.sum(), greenish.sum())
    with pytest.raises(KeyError, match="no-such-slide"):
        heatmaps(tiny_run, "no-such-slide")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.long
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    """The report is one HTML file with every image embedded; Chromium (Debian's package) renders it: the
    screenshot holds the heading rule's colour, and many colours (figures), not a blank page."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("UBC_OCEAN_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required here (UBC_OCEAN_REQUIRE_BROWSER) but not installed")
        pytest.skip("no chromium on PATH (apt-get install chromium); .ci/run installs it")
    from ubc_ocean.viz.report import run as write_report

    path = write_report(tiny_run, worst=2)
    page = path.read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http" not in text and "file:" not in text  # nothing fetched from anywhere
    copy = tmp_path / "report.html"  # rendered from a folder with nothing else in it: self-contained
    copy.write_text(page)
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1600",
         f"--screenshot={shot}", copy.as_uri()], capture_output=True, text=True, timeout=180)
    assert shot.is_file(), result.stderr[-2000:]
    rgb = read_rgb(shot)[..., :3].astype(int)
    assert rgb.shape[:2] == (1600, 1280)
    rule = (np.abs(rgb - np.array([0x34, 0x65, 0xA4])) <= 2).all(axis=-1)  # h1's bottom border, h2 text
    assert rule.sum() > 1000
    not_white = (rgb < 240).any(axis=-1).mean()
    colours = len(np.unique(rgb.reshape(-1, 3) // 8, axis=0))
    assert not_white > 0.1 and colours > 200, (not_white, colours)
