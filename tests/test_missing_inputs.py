"""A stage whose input is missing (no data downloaded, or the stage before not run) says so in one line:
``missing input: <path> <problem>: <what makes it>`` on stderr, exit status 2, as a new user would meet it at
the command line (``cli.main``, the doors' code, run here in the test's process)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.builders import LEAN, REPO, tiny_overrides
from ubc_ocean.cli import main

STAGES = {
    "01": "ubc_ocean.tiling.stage:run", "02": "ubc_ocean.external.stage:run", "03": "ubc_ocean.features.stage:run",
    "04": "ubc_ocean.mil.stage:run", "05": "ubc_ocean.inference.stage:run", "06": "ubc_ocean.submit.stage:run",
}
RAW_REMEDY = "download the competition data into"


def _run_stage(stage: str, root: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(root, *LEAN)]
    capsys.readouterr()
    code = main(STAGES[stage], f"stage {stage}", argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _link(built: Path, root: Path, *parts: str) -> None:
    """``root/part`` points at the built pipeline's ``part`` (read-only use)."""
    for part in parts:
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        (root / part).symlink_to(built / part)


def _one_missing_input_line(code: int, lines: list[str], path: Path, remedy: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"missing input: {path}"), lines[0]
    assert remedy in lines[0], lines[0]


# (stage, the file it misses on an empty data root, what makes that file)
EMPTY_ROOT = [
    ("01", "raw/train.csv", RAW_REMEDY),
    ("02", "interim/tiles", "run stage 01 first (scripts/01_tile_slides.py)"),  # the tiling key's folder
    ("03", "processed/manifest.csv", "run stage 02 first (scripts/02_merge_external.py)"),
    ("04", "processed/manifest.csv", "run stage 02 first (scripts/02_merge_external.py)"),
    ("05", "runs/demo", "run stage 04 first (scripts/04_train_cv.py)"),
    ("06", "runs/demo", "run stage 04 first (scripts/04_train_cv.py)"),
]


@pytest.mark.parametrize(("stage", "missing", "remedy"), EMPTY_ROOT, ids=[row[0] for row in EMPTY_ROOT])
def test_each_stage_on_an_empty_data_root_names_its_missing_input_in_one_line(stage, missing, remedy, tmp_path,
                                                                              capsys):
    code, lines = _run_stage(stage, tmp_path, capsys)
    _one_missing_input_line(code, lines, tmp_path / missing, remedy)
    assert not (tmp_path / "processed").exists() and not (tmp_path / "runs").exists()  # refused, nothing written
    if remedy == RAW_REMEDY:
        assert "make demo" in lines[0]  # the synthetic set, for whoever has no competition data yet


def test_stage_02_before_stage_01_names_the_tile_store(pipeline, tmp_path, capsys):
    _link(pipeline, tmp_path, "raw", "external")
    code, lines = _run_stage("02", tmp_path, capsys)
    tiles = next((pipeline / "interim" / "tiles").iterdir()).name  # the tiling key's folder
    _one_missing_input_line(code, lines, tmp_path / "interim" / "tiles" / tiles,
                            "run stage 01 first (scripts/01_tile_slides.py)")
    assert not (tmp_path / "processed").exists()  # refused before anything was written


def test_stage_04_before_stage_03_names_the_embeddings_folder(pipeline, tmp_path, capsys):
    _link(pipeline, tmp_path, "raw", "external", "interim", "processed/manifest.csv", "processed/folds.csv")
    code, lines = _run_stage("04", tmp_path, capsys)
    embeddings = sorted(p.name for p in (pipeline / "processed" / "embeddings").iterdir())
    trained_on = [name for name in embeddings if (tmp_path / "processed" / "embeddings" / name).as_posix() in lines[0]]
    assert len(trained_on) == 1, (embeddings, lines)
    _one_missing_input_line(code, lines, tmp_path / "processed" / "embeddings" / trained_on[0],
                            "run stage 03 first (scripts/03_cache_embeddings.py)")
    assert not (tmp_path / "runs").exists()


def test_stage_05_without_test_csv_names_the_raw_folder(pipeline, tmp_path, capsys):
    _link(pipeline, tmp_path, "external", "interim", "processed", "runs")
    (tmp_path / "raw").mkdir()
    for item in (pipeline / "raw").iterdir():
        if item.name != "test.csv":
            (tmp_path / "raw" / item.name).symlink_to(item)
    code, lines = _run_stage("05", tmp_path, capsys)
    _one_missing_input_line(code, lines, tmp_path / "raw" / "test.csv", RAW_REMEDY)


def test_stage_06_before_stage_05_names_the_model_without_test_predictions(pipeline, tmp_path, capsys):
    _link(pipeline, tmp_path, "raw", "external", "interim", "processed")
    shutil.copytree(pipeline / "runs", tmp_path / "runs")
    for path in (tmp_path / "runs" / "demo" / "abmil").glob("test_predictions*"):
        path.unlink()
    code, lines = _run_stage("06", tmp_path, capsys)
    _one_missing_input_line(code, lines, tmp_path / "runs" / "demo" / "abmil",
                            "run stage 05 first (scripts/05_infer_test.py)")
    assert "holds no test predictions" in lines[0]
    assert not (tmp_path / "submissions").exists()
