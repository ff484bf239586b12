"""scripts/benchmark.py: configurations checked before any work, and the whole benchmark end to end on tiny data."""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import pytest

from tests.builders import LEAN, REPO, run_script, tiny_config, tiny_overrides
from ubc_ocean.config import ConfigError
from ubc_ocean.submit.stage import oof_calibration

# No external sources: fewer slides to tile and embed in the end-to-end run (stage 00 still writes one of each:
# with none it fails on main, an empty labels table).
NO_EXTERNAL = ("synthetic.external_tiff_slides=1", "synthetic.external_patch_slides=1", "external.sources=[]")
# Two configurations that run, and one that fails in stage 02 (after loading well).
THREE = ("benchmark.configurations=[{name: base, overrides: []}, "
         "{name: maxprob, overrides: [mil.epochs=2, outliers.score=max_prob]}, "
         "{name: broken, overrides: [folds.group_by=no_such_column]}]")
# Each configuration that runs is trained again on folds grouped by the training hospitals (stages 02 and 04).
GROUPED = ("synthetic.train_hospital_column=true", "benchmark.grouped_folds=hospital")


def _benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=900)


@pytest.mark.parametrize(
    ("configurations", "message"),
    [("[{name: a, overrides: [paths.data_root=x]}]",
      "benchmark.configurations[0].overrides may not set paths.data_root"),
     ("[{name: a, overrides: [synthetic.seed=3]}]", "may not set synthetic.seed"),
     ("[{name: a, overrides: [experiment=x]}]", "may not set experiment"),
     ("[{name: a}, {name: a}]", "benchmark.configurations[1].name must be a unique name"),
     ("[{name: a, overrides: [mil.epochs]}]", "benchmark.configurations[0].overrides must be a list of KEY=VALUE"),
     ("[{name: a, overides: []}]", "unknown config key 'benchmark.configurations[0].overides'")],
)
def test_configurations_are_checked_at_load(tmp_path, configurations, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_config(tmp_path, f"benchmark.configurations={configurations}")


@pytest.mark.parametrize(
    ("override", "message"),
    [("tiling.tile_sise=64", "benchmark configuration 'bad': unknown config key 'tiling.tile_sise'"),
     ("mil.epochs=0", "benchmark configuration 'bad': mil.epochs must be an integer >= 1; got 0"),
     ("'mil.models=[abmil,nosuchmodel]'", "benchmark configuration 'bad': mil.models: unknown MIL model")],
)
def test_every_configuration_is_loaded_before_any_work(tmp_path, override, message, monkeypatch, capsys):
    """The second configuration is bad: the script says which and why (exit 2) and has made nothing."""
    root = tmp_path / "data"
    configurations = f"[{{name: good, overrides: []}}, {{name: bad, overrides: [{override}]}}]"
    code, _, err = run_script("benchmark.py", "--config", "configs/demo.yaml", *tiny_overrides(root),
                              f"benchmark.configurations={configurations}", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2, err[-2000:]
    assert message in err
    assert not root.exists()


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path):
    """Stage 00 and three configurations on tiny data (the second reuses the first's tiles and embeddings,
    the third fails in stage 02): the table, the CSV and the RESULT line agree, the baseline's difference
    with itself is exactly 0, the best configuration is the one of highest OOF balanced accuracy, and the
    failed one is a row of its own and exit status 1. The two that run are trained again on hospital folds:
    their OOF BA (grouped) is their grouped experiment's, and the data root's folds are the plain ones again."""
    root = tmp_path / "data"
    args = ("--config", "configs/demo.yaml", *tiny_overrides(root), *LEAN, *NO_EXTERNAL, "experiment=bench", THREE,
            *GROUPED, "benchmark.bootstrap=200", "runtime.log_level=WARNING")
    result = _benchmark(*args)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "benchmark configurations failed: broken (their logs:" in result.stderr
    lines = result.stdout.strip().splitlines()
    found = re.fullmatch(r"RESULT best_test_ba=(\S+) baseline_test_ba=(\S+) oof_test_gap=(\S+) best=(\S+) "
                         r"baseline_gap=(\S+) baseline_site_auc=(\S+) oof_test_rank=n/a oof_test_rank_grouped=n/a",
                         lines[-1])
    assert found, lines[-5:]
    folder = root / "runs" / "bench"
    results = pd.read_csv(folder / "results.csv")
    assert list(results.experiment) == ["bench-base", "bench-maxprob", "bench-broken"]
    broken = results.iloc[2]
    assert broken.status.startswith("failed: ValueError: folds.group_by 'no_such_column' is not a column")
    assert not broken.best_oof and pd.isna(broken.test_ba) and pd.isna(broken.oof_ba_grouped)
    assert "Traceback" in (folder / "configurations" / "broken" / "stages.log").read_text()
    assert "| broken | failed: ValueError" in (folder / "results.md").read_text()
    results = results.iloc[:2]
    assert list(results.configuration) == ["base", "maxprob"] and (results.status == "ok").all()
    best = results.loc[results.oof_ba.idxmax()]
    base = results.set_index("configuration").loc["base"]
    assert found.group(4) == best.configuration and bool(best.best_oof) and results.best_oof.sum() == 1
    assert float(found.group(1)) == pytest.approx(best.test_ba, abs=5e-4)
    assert float(found.group(2)) == pytest.approx(base.test_ba, abs=5e-4)
    assert float(found.group(3)) == pytest.approx(best.oof_ba - best.test_ba, abs=5e-4)
    assert float(found.group(5)) == pytest.approx(base.oof_ba - base.test_ba, abs=5e-4)
    assert float(found.group(6)) == pytest.approx(base.site_auc, abs=5e-4) and 0 <= base.site_auc <= 1
    assert (base.delta_test_ba, base.delta_test_ba_low, base.delta_test_ba_high) == (0.0, 0.0, 0.0)
    for _, row in results.iterrows():
        assert 0 <= row.test_ba_low <= row.test_ba <= row.test_ba_high <= 1
        assert 0 <= row.oof_ba <= 1 and row.wall_s > 0
        scored = pd.read_csv(folder / "configurations" / row.configuration / "scored.csv")
        submission = pd.read_csv(root / "submissions" / f"{row.experiment}.csv")
        assert len(scored) == len(submission) == len(pd.read_csv(root / "raw" / "test.csv"))
    markdown = (folder / "results.md").read_text()
    assert "| configuration | OOF BA | OOF BA (grouped) | test BA [95% CI] |" in markdown
    assert "| site AUC (WSI, TMA) |" in markdown
    assert f"| {base.site_auc:.3f} (" in markdown
    assert f"| {base.test_ba:.3f} [{base.test_ba_low:.3f}, {base.test_ba_high:.3f}] |" in markdown
    assert "| base (baseline) |" in markdown or "| **base** (baseline) |" in markdown
    assert "wall times: base " in result.stdout
    train = pd.read_csv(root / "raw" / "train.csv", dtype={"image_id": str})
    for _, row in results.iterrows():  # the grouped figure is the grouped experiment's ensemble OOF BA
        overrides = "" if pd.isna(row.overrides) else row.overrides
        grouped_cfg = tiny_config(root, *LEAN, f"experiment={row.experiment}-grouped", *overrides.split())
        assert row.oof_ba_grouped == pytest.approx(oof_calibration(grouped_cfg).metrics["balanced_accuracy"])
        oof = pd.read_csv(root / "runs" / f"{row.experiment}-grouped" / "abmil" / "oof.csv", dtype={"image_id": str})
        hospital = oof["image_id"].map(train.set_index("image_id")["hospital"])
        assert (oof.assign(hospital=hospital).groupby("hospital")["fold"].nunique() == 1).all()
    manifest = pd.read_csv(root / "processed" / "manifest.csv", dtype={"image_id": str, "group": str})
    assert (manifest["group"] == manifest["image_id"]).all()  # the plain folds written back
    timings = pd.read_csv(folder / "timings.csv")
    assert set(timings.stage) == {"00_data", "01_tile", "02_merge", "03_embed", "04_train", "05_infer", "06_submit",
                                  "02_merge_grouped", "04_train_grouped"}
    # One tiling and one set of embeddings served both configurations.
    assert len(list((root / "interim" / "tiles").iterdir())) == 1
    assert len([p for p in (root / "processed" / "embeddings").iterdir() if p.is_dir()]) == 1
    # Resumed: the two that ran to the end are read back (same figures), the failed one runs again.
    again = _benchmark(*args, "benchmark.resume=true", "runtime.log_level=INFO")
    assert again.returncode == 1 and again.stdout.strip().splitlines()[-1] == lines[-1]
    log = (folder / "benchmark.log").read_text()
    assert "benchmark base: read back from" in log and "benchmark maxprob: read back from" in log
    assert "benchmark base (grouped folds): read back from" in log
    pd.testing.assert_frame_equal(pd.read_csv(folder / "results.csv").iloc[:2], results)
