"""Folds grouped by hospital or by stain cluster (``folds.group_by``): slide stain vectors recover a planted
stain difference, and stage 02 keeps every group in one validation fold."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from tests.builders import default_config
from ubc_ocean import layout, tile_store
from ubc_ocean.config import Config
from ubc_ocean.external.stage import run as merge
from ubc_ocean.folds import TRAIN_ONLY, assign_folds
from ubc_ocean.stain_vectors import COLUMNS, MACENKO, MEAN_OD, cluster_stain_vectors, stain_vector
from ubc_ocean.synthetic.morphology import StainMaps, smooth_noise
from ubc_ocean.synthetic.stain import StainModel, hospital_stain

CLASSES = ("CC", "EC", "HGSC", "LGSC", "MC")
# Two stain styles clearly apart: the standard one and the blue-purple light one of the default unseen hospital.
STYLES = (0, 4)
HOSPITALS = (0, 1, 2, 3)  # hospitals 0 and 1 stain in style 0, 2 and 3 in style 4
SLIDES_PER_HOSPITAL = 5


def _tiles(model: StainModel, rng: np.random.Generator, n_tiles: int = 4, side: int = 48) -> list[np.ndarray]:
    """Tissue tiles rendered by Beer-Lambert from smooth random hematoxylin and eosin concentrations."""
    tiles = []
    for _ in range(n_tiles):
        hema = np.clip(smooth_noise(rng, (side, side), 6) * 0.6 + 0.6, 0, None).astype(np.float32)
        eosin = np.clip(smooth_noise(rng, (side, side), 10) * 0.4 + 0.5, 0, None).astype(np.float32)
        tiles.append(model.to_rgb(StainMaps(hema, eosin, np.zeros_like(hema))))
    return tiles


def _slide_model(style: int, hospital: int, slide: int) -> StainModel:
    return hospital_stain(STYLES[style]).jittered(np.random.default_rng([hospital, slide]))


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def test_stain_vectors_recover_the_stains_and_a_planted_stain_difference():
    """Slides of two stain styles (each slide its own jitter): the Macenko fit finds each slide's hematoxylin
    and eosin directions within 2 and 3.5 degrees, and k-means on the vectors splits the styles exactly."""
    vectors, truth = [], []
    for style in (0, 1):
        for slide in range(6):
            model = _slide_model(style, style, slide)
            vector, fit = stain_vector(_tiles(model, np.random.default_rng([style, slide, 1])))
            assert fit == MACENKO
            assert _angle(vector[:3], model.hema) < 2 and _angle(vector[3:6], model.eosin) < 3.5  # measured: 1.2, 2.4
            vectors.append(vector)
            truth.append(style)
    clusters = cluster_stain_vectors(pd.DataFrame(vectors, columns=COLUMNS), 2, seed=0)
    assert adjusted_rand_score(truth, clusters) == 1.0


def test_too_little_tissue_falls_back_to_the_mean_optical_density():
    """A tile of 10x10 tissue pixels of one colour on black background is no Macenko fit: both stains take the
    direction of its optical density, and both strengths its length."""
    tile = np.zeros((40, 40, 3), np.uint8)
    tile[:10, :10] = (120, 60, 150)
    vector, fit = stain_vector([tile])
    od = -np.log((np.array([120, 60, 150]) + 1) / 240)
    assert fit == MEAN_OD
    length = np.linalg.norm(od)
    np.testing.assert_allclose(vector, np.concatenate([od / length, od / length, [length, length]]))
    vector, fit = stain_vector([np.zeros((8, 8, 3), np.uint8)])  # no tissue at all: zeros, not NaN
    assert fit == MEAN_OD and (vector == 0).all()


def _write_slide(folder: Path, tiles: list[np.ndarray], cores: list[str] = ()) -> None:
    folder.mkdir(parents=True)
    rows = []
    for k, tile in enumerate(tiles):
        name = tile_store.tile_file_name(k * 48, 0, "png")
        tile_store.write_tile(folder / name, tile, "png", 90)
        rows.append({"file": name, "x": k * 48, "y": 0, "extent": 48, "magnification": 20, "tissue_fraction": 1.0,
                     "blur_score": 100.0})
    tile_store.write_index(folder, rows)
    info = {"n_tiles": len(tiles), "is_tma": False}
    if cores:
        info[tile_store.CORES_KEY] = [{"image_id": core} for core in cores]
    tile_store.write_slide_info(folder, info, None)


@pytest.fixture(scope="module")
def hospitals_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-01 tile store of 4 hospitals x 5 slides (labels cycling over the classes): hospitals 0 and 1 stain
    in one style, 2 and 3 in another; ``train.csv`` names each slide's hospital. Slide 0 has a synthetic core."""
    root = tmp_path_factory.mktemp("hospitals")
    cfg = default_config(root, "external.sources=[]")
    rows = []
    for hospital in HOSPITALS:
        for slide in range(SLIDES_PER_HOSPITAL):
            image_id = str(100 * (hospital + 1) + slide)
            label = CLASSES[(hospital * SLIDES_PER_HOSPITAL + slide) % len(CLASSES)]
            rows.append({"image_id": image_id, "label": label, "image_width": 96, "image_height": 48,
                         "is_tma": False, "hospital": hospital})
            model = _slide_model(hospital // 2, hospital, slide)
            tiles = _tiles(model, np.random.default_rng([hospital, slide, 2]), n_tiles=2)
            cores = [f"{image_id}_core0"] if image_id == "100" else []
            _write_slide(layout.slide_tiles_dir(cfg, "train", image_id), tiles, cores)
            for core in cores:
                _write_slide(layout.slide_tiles_dir(cfg, "train", core), tiles[:1])
    Path(cfg.paths.raw).mkdir(parents=True)
    pd.DataFrame(rows).to_csv(Path(cfg.paths.raw) / cfg.data.train_csv, index=False)
    return root


def _merged(root: Path, *overrides: str) -> tuple[Config, pd.DataFrame]:
    """Stage 02 on ``root`` with two folds: its config and manifest, with the folds as folds.csv holds them."""
    cfg = default_config(root, "external.sources=[]", "folds.n_splits=2", *overrides)
    manifest = merge(cfg)
    written = pd.read_csv(layout.folds_path(cfg), dtype={"image_id": str})
    assert written["fold"].tolist() == manifest["fold"].tolist()
    return cfg, manifest


def test_folds_grouped_by_stain_cluster_keep_each_cluster_in_one_validation_fold(hospitals_data):
    """Stage 02 with folds.group_by=stain_cluster: the two stain clusters are the two stain styles (adjusted
    Rand index 1), each validates in a fold of its own, and the synthetic core follows its parent."""
    cfg, manifest = _merged(hospitals_data, "folds.group_by=stain_cluster")
    vectors = pd.read_csv(layout.stain_vectors_path(cfg), dtype={"slide_id": str})
    assert list(vectors.columns) == ["slide_id", *COLUMNS, "fit", "cluster"]
    assert len(vectors) == len(HOSPITALS) * SLIDES_PER_HOSPITAL and (vectors["fit"] == MACENKO).all()
    style = vectors["slide_id"].str.split("/").str[1].astype(int) // 100 - 1 >= 2
    assert adjusted_rand_score(style, vectors["cluster"]) == 1.0
    real = manifest[manifest["parent_image_id"].isna()]
    assert (real.groupby("group")["fold"].nunique() == 1).all() and real["group"].nunique() == 2
    assert sorted(real["fold"].unique()) == [0, 1]
    core = manifest.set_index("image_id").loc["100_core0"]
    parent = manifest.set_index("image_id").loc["100"]
    assert (core["group"], core["fold"]) == (parent["group"], parent["fold"])
    assert core["group"].startswith("stain_cluster:")
    _, again = _merged(hospitals_data, "folds.group_by=stain_cluster")
    assert again["fold"].tolist() == manifest["fold"].tolist()  # seeded


def test_folds_grouped_by_hospital_validate_each_hospital_in_one_fold(hospitals_data):
    """folds.group_by=hospital (a train.csv column): each hospital validates in one fold; the plain folds split
    some hospital between folds; a column train.csv lacks is named."""
    _, manifest = _merged(hospitals_data, "folds.group_by=hospital")
    real = manifest[manifest["parent_image_id"].isna()]
    assert (real.groupby("group")["fold"].nunique() == 1).all()
    assert sorted(real["group"].unique()) == ["0", "1", "2", "3"] and set(real["fold"]) == {0, 1}
    _, plain = _merged(hospitals_data)
    plain = plain[plain["parent_image_id"].isna()]
    plain = plain.assign(hospital=plain["image_id"].astype(int) // 100 - 1)
    assert (plain.groupby("hospital")["fold"].nunique() > 1).any() and TRAIN_ONLY not in set(plain["fold"])
    with pytest.raises(ValueError, match=re.escape("folds.group_by 'patient' is not a column of train.csv")):
        _merged(hospitals_data, "folds.group_by=patient")


def test_fewer_groups_than_folds_is_an_error_naming_them():
    frame = pd.DataFrame({"label": ["CC", "EC"] * 6, "is_tma": False, "group": ["a", "b"] * 6})
    with pytest.raises(ValueError, match=r"2 groups \(a, b\) cannot fill 3 folds"):
        assign_folds(frame, 3, seed=0, group_column="group")
