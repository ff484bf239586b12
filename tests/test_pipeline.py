"""Stages 00-06 end to end on a tiny synthetic data set, and every stage script's command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest

from tests.builders import REPO, tiny_config, tiny_overrides

STAGES = [
    "00_make_synthetic_data", "01_tile_slides", "02_merge_external", "03_cache_embeddings",
    "04_train_cv", "05_infer_test", "06_ensemble_submit",
]
TOOLS = ["eval_leave_one_class_out", "calibrate_focus", "heatmaps", "report", "07_package_kaggle", "benchmark"]
ALLOWED = {"CC", "EC", "HGSC", "LGSC", "MC", "Other"}


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.parametrize("stage", STAGES + TOOLS)
def test_every_stage_has_help(stage):
    result = _script(stage, "--help")
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "KEY=VALUE" in result.stdout


def test_misspelt_key_fails_naming_it():
    result = _script("01_tile_slides", "--config", "configs/demo.yaml", "tiling.tile_sise=64")
    assert result.returncode == 2
    assert "tiling.tile_sise" in result.stderr and "tile_size" in result.stderr


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    from ubc_ocean.external.stage import run as merge
    from ubc_ocean.features.stage import run as embed
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train
    from ubc_ocean.submit.stage import run as submit
    from ubc_ocean.synthetic import run as make_data
    from ubc_ocean.tiling.stage import run as tile

    cfg = tiny_config(tmp_path)
    # Stage 00 through its script (the path users take), the rest in-process.
    result = _script("00_make_synthetic_data", "--config", "configs/demo.yaml", *tiny_overrides(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    make_data(cfg)  # a second run is a no-op (everything exists)

    counts = tile(cfg)
    assert counts["failed"] == 0 and counts["done"] > 0
    assert tile(cfg)["skipped"] == counts["done"]  # resumable: nothing redone

    manifest = merge(cfg)
    train_csv = pd.read_csv(Path(cfg.paths.raw) / "train.csv")
    assert set(manifest.loc[manifest.source == "train", "image_id"].astype(int)) == set(train_csv.image_id)
    external = manifest[manifest.provenance.str.startswith("external")]
    assert len(external) == 4 and (external.fold == -1).all()

    root = embed(cfg)
    some = next(root.glob("train/*.h5"))
    with h5py.File(some) as handle:
        assert handle["features"].dtype.name == "float16" and handle["features"].shape[1] == 1280
        assert handle["coords"].shape == (handle["features"].shape[0], 2)
        assert handle.attrs["encoder"] == "efficientnet_lite0"

    metrics = train(cfg)
    assert set(metrics) == {"abmil", "transmil"}
    run_dir = Path(cfg.paths.runs) / "demo"
    for name in metrics:
        oof = pd.read_csv(run_dir / name / "oof.csv")
        assert set(oof.slide_id) == set(manifest.loc[manifest.fold >= 0, "slide_id"])
        assert (run_dir / name / "outlier.json").is_file() and (run_dir / name / "confusion.png").is_file()

    infer(cfg)
    path = submit(cfg)
    assert path == tmp_path / "submissions" / "submission.csv"
    submission = pd.read_csv(path)
    test_csv = pd.read_csv(Path(cfg.paths.raw) / "test.csv")
    assert list(submission.columns) == ["image_id", "label"]
    assert sorted(submission.image_id) == sorted(test_csv.image_id)
    assert set(submission.label) <= ALLOWED

    # Stage 05 again in two shards: the unsharded files are replaced, not read twice; an empty shard
    # (more shards than images) writes an empty table instead of crashing.
    n_test = len(test_csv)
    for index in range(2):
        infer(tiny_config(tmp_path, f"runtime.shard={index}/2"))
    for name in metrics:
        files = sorted(p.name for p in (run_dir / name).glob("test_predictions*.csv"))
        assert files == ["test_predictions_shard0of2.csv", "test_predictions_shard1of2.csv"]
    assert pd.read_csv(submit(cfg)).equals(submission)
    empty = tiny_config(tmp_path, f"runtime.shard={n_test}/{n_test + 1}")
    written = infer(empty)
    assert all(pd.read_csv(p).empty for p in written.values())
    # Retraining a model replaces its folder: no stale checkpoint or test prediction survives.
    retrained = tiny_config(tmp_path, "mil.models=[abmil]", "mil.seeds=[5]")
    train(retrained)
    assert sorted(p.name for p in (run_dir / "abmil").glob("*.pt")) == [f"fold{f}_seed5.pt" for f in range(2)]
    assert not list((run_dir / "abmil").glob("test_predictions*.csv"))
