"""Stain normalisation (``features.stain_normalisation``, torchstain's numpy backend): known answers on tiles
rendered by the Beer-Lambert law from known stain vectors, the reference record, and stages 03-05 with it on
(the reference fitted by stage 03, copied into the run by stage 04, required by stage 05 and the bundle)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchstain.numpy.utils.rgb2lab import rgb2lab
from torchstain.numpy.utils.split import lab_split

from tests.builders import LEAN, built_once, tiny_config
from ubc_ocean import embedding_cache, layout
from ubc_ocean.config import Config, ConfigError
from ubc_ocean.sources import TEST, TRAIN, competition_specs
from ubc_ocean.stain_normalisation import StainNormaliser, StainReference

CPU = torch.device("cpu")
# Haematoxylin and eosin optical-density vectors (RGB) of the "original" lab, and of a lab whose stains differ
H, E = np.array([0.65, 0.70, 0.29]), np.array([0.22, 0.80, 0.56])
SHIFTED_H, SHIFTED_E = np.array([0.52, 0.78, 0.35]), np.array([0.30, 0.85, 0.43])


def concentrations(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin concentration maps of an H&E-like tile: round nuclei (haematoxylin, up to 1.2)
    in a textured eosin stroma (0.6-1.2) that thins out where the nuclei are."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    h = np.zeros((size, size))
    for cy, cx, r in zip(rng.uniform(0, size, 30), rng.uniform(0, size, 30), rng.uniform(3, 7, 30), strict=True):
        h = np.maximum(h, np.clip(1.2 * (1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2), 0, None))
    e = 0.9 + 0.3 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + 0.05 * rng.standard_normal((size, size))
    return h, np.clip(e, 0, None) * np.clip(1 - h / 0.6, 0, 1)


def render(h: np.ndarray, e: np.ndarray, h_vector: np.ndarray, e_vector: np.ndarray, io: float = 240) -> np.ndarray:
    """Beer-Lambert: transmitted light ``io * exp(-OD)``, the OD the concentrations times the unit stain vectors."""
    od = h[..., None] * (h_vector / np.linalg.norm(h_vector)) + e[..., None] * (e_vector / np.linalg.norm(e_vector))
    return np.clip(np.round(io * np.exp(-od)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiles() -> tuple[np.ndarray, np.ndarray]:
    """An H&E tile (224 px) and the same tissue stained by the other lab: more haematoxylin (x1.3), less eosin
    (x0.8), other stain vectors."""
    h, e = concentrations(224, seed=0)
    return render(h, e, H, E), render(1.3 * h, 0.8 * e, SHIFTED_H, SHIFTED_E)


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def test_macenko_maps_a_stain_shifted_tile_back_to_the_original(tiles):
    """Fitted on the original tile, Macenko finds its stain vectors and renders the shifted tile with them: the
    mean RGB error to the original falls from ~16 to ~0.6 (bound 1.5)."""
    original, shifted = tiles
    reference = StainReference.fit("macenko", [original], ["original"])
    fitted = np.asarray(reference.parameters["stain_matrix"])
    np.testing.assert_allclose(fitted[:, 0], H / np.linalg.norm(H), atol=0.02)  # haematoxylin, then eosin
    np.testing.assert_allclose(fitted[:, 1], E / np.linalg.norm(E), atol=0.02)
    normaliser = StainNormaliser(reference)
    normalised = normaliser(shifted[None])[0]
    before, after = _mean_abs(shifted, original), _mean_abs(normalised, original)
    assert before > 10 and after < 1.5, (before, after)
    assert normaliser.unchanged == 0


def _lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each LAB channel in torchstain's scale (what Reinhard matches)."""
    channels = lab_split(rgb2lab(rgb.astype(np.float32) / 255))
    return np.array([c.mean() for c in channels]), np.array([c.std() for c in channels])


def test_reinhard_matches_the_references_lab_means_and_stds(tiles):
    original, shifted = tiles
    reference = StainReference.fit("reinhard", [original], ["original"])
    means, stds = _lab_stats(StainNormaliser(reference)(shifted[None])[0])
    want_means, want_stds = np.array(reference.parameters["lab_means"]), np.array(reference.parameters["lab_stds"])
    np.testing.assert_allclose(want_means, _lab_stats(original)[0], atol=1e-3)
    assert np.abs(_lab_stats(shifted)[0] - want_means).max() > 5  # the shift is large: the check has teeth
    np.testing.assert_allclose(means, want_means, atol=0.5)  # uint8 truncation costs ~0.2 of L
    np.testing.assert_allclose(stds, want_stds, rtol=0.03)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_blank_tiles_and_black_fill_are_left_as_they_are(tiles, method):
    """A white (glass) tile and a black-fill tile cannot be fitted: returned unchanged and counted, while the
    tissue tile beside them in the batch is normalised; a tissue tile's black fill pixels stay black."""
    original, shifted = tiles
    normaliser = StainNormaliser(StainReference.fit(method, [original], ["original"]))
    edge = shifted.copy()
    edge[:, :80] = 0  # the WSIs' black fill beside the tissue
    batch = np.stack([np.full_like(shifted, 255), shifted, np.zeros_like(shifted), edge])
    out = normaliser(batch)
    assert out.dtype == np.uint8 and out.shape == batch.shape and normaliser.unchanged == 2
    np.testing.assert_array_equal(out[0], batch[0])
    np.testing.assert_array_equal(out[2], batch[2])
    assert _mean_abs(out[1], original) < _mean_abs(shifted, original) / 2
    assert (out[3][:, :80] == 0).all() and _mean_abs(out[3][:, 80:], original[:, 80:]) < 5


def test_reference_json_round_trips_with_its_sha256_and_refuses_edits(tiles, tmp_path):
    original, _ = tiles
    reference = StainReference.fit("macenko", [original], ["train/1/0_0.jpg"], sample={"seed": 1})
    path = reference.save(tmp_path / "stain_reference.json")
    loaded = StainReference.load(path)
    assert loaded == reference and loaded.sha256 == reference.sha256
    record = json.loads(path.read_text())
    assert record["sha256"] == reference.sha256 and record["tiles"] == ["train/1/0_0.jpg"]
    assert record["torchstain_version"] and record["method"] == "macenko"
    record["parameters"]["max_concentrations"][0] *= 1.01
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="sha256"):
        StainReference.load(path)
    other = StainReference.fit("macenko", [original[:112]], ["train/1/0_0.jpg"], sample={"seed": 1})
    assert other.sha256 != reference.sha256


def test_fitting_and_normalising_load_no_torch():
    """Stain normalisation stays torch-free (torchstain's numpy backend), beside the tile store: checked in a
    fresh interpreter."""
    code = ("import sys, numpy as np; from ubc_ocean.stain_normalisation import StainNormaliser, StainReference; "
            "tile = np.random.default_rng(0).integers(30, 200, (64, 64, 3), dtype=np.uint8); "
            "StainNormaliser(StainReference.fit('macenko', [tile] * 4, ['t'] * 4))(tile[None]); "
            "print(sorted(m for m in ('torch', 'timm', 'torchstain.torch') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_config_keys_and_folder_names(tmp_path):
    with pytest.raises(ConfigError, match="stain_tta"):
        tiny_config(tmp_path, "features.stain_tta=true")
    with pytest.raises(ConfigError, match="stain_normalisation"):
        tiny_config(tmp_path, "features.stain_normalisation=vahadane")
    plain = tiny_config(tmp_path)
    both = tiny_config(tmp_path, "features.stain_normalisation=macenko", "features.stain_tta=true",
                       "features.stain_augmentation=0.2", "features.tta=flips")
    assert layout.embeddings_root(both).name == layout.embeddings_root(plain).name.replace(
        "__", "-tta-flips-macenko-stta-stain0.2__", 1)
    assert layout.test_embeddings_root(both).name == layout.embeddings_root(plain).name.replace(
        "__", "-tta-flips-macenko-stta__", 1)  # test tiles are normalised, never jittered


@pytest.mark.long
def test_pipelined_and_in_process_inference_both_normalise(tiny_raw, tiles, tmp_path):
    """Stage 05's two ways (decoder processes feeding a consumer; one process) give the same normalised
    features, which are not the raw tiles' (``features.stain_tta``: their mean with them)."""
    from ubc_ocean.inference.decoding import SlideJob
    from ubc_ocean.inference.pipeline import FusedPipeline

    reference = StainReference.fit("reinhard", [tiles[0]], ["original"])

    def features(workers: int, *extra: str, stain: StainReference | None = reference) -> np.ndarray:
        cfg = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}", "tiling.max_tiles_per_slide=8", *extra)
        jobs = iter([SlideJob(competition_specs(cfg, TEST)[0])])
        (result,) = FusedPipeline(cfg, devices=[CPU], workers=workers, stain=stain).run(lambda: next(jobs, None))
        assert result.status == "done", result.message
        return result.features

    plain = features(1, stain=None)
    alone = features(1, "features.stain_normalisation=reinhard")
    pipelined = features(2, "features.stain_normalisation=reinhard")
    np.testing.assert_allclose(pipelined, alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(alone, plain, atol=1e-2)
    both = features(1, "features.stain_normalisation=reinhard", "features.stain_tta=true")
    np.testing.assert_allclose(both, (plain + alone) / 2, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="needs a reinhard stain reference"):
        features(1, "features.stain_normalisation=reinhard", stain=None)


# ------------------------------------------------------------------------------------ stages 03-05


STAIN = ("features.stain_normalisation=macenko", "features.stain_reference_tiles=20")


def _copy(source: Path, target: Path) -> Config:
    shutil.copytree(source, target)
    return tiny_config(target, *LEAN, *STAIN)


@pytest.fixture(scope="session")
def normalised(pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A copy of the tiny pipeline's data with stages 03-05 run again, Macenko-normalised (about 20 s); built
    once per test run, read-only."""
    from ubc_ocean.features.stage import run as embed
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train

    def build(folder: Path) -> None:
        cfg = _copy(pipeline, folder)
        embed(cfg)
        train(cfg)
        infer(cfg)

    return tiny_config(built_once(tmp_path_factory, "stain_normalised", build), *LEAN, *STAIN)


@pytest.mark.long
def test_stages_03_to_05_share_one_reference(normalised, pipeline):
    cfg = normalised
    root = layout.embeddings_root(cfg)
    assert "-macenko__" in root.name
    reference = StainReference.load(layout.stain_reference_path(root))
    assert reference.method == "macenko" and len(reference.tiles) == 20
    assert all(name.startswith(f"{TRAIN}/") for name in reference.tiles)
    slides = {name.rsplit("/", 1)[0] for name in reference.tiles}
    assert len(slides) == min(20, len(competition_specs(cfg, TRAIN)))  # spread over the slides
    training = sorted((root / TRAIN).glob("*.h5"))
    assert training and all(embedding_cache.read_attrs(p)["stain_reference"] == reference.sha256 for p in training)
    plain = layout.embeddings_root(tiny_config(pipeline, *LEAN)) / TRAIN / training[0].name
    assert not np.allclose(embedding_cache.read_embeddings(training[0])[0], embedding_cache.read_embeddings(plain)[0],
                           atol=1e-2)
    # stage 04: the run holds the reference, each model records it and its features' normalisation
    assert StainReference.load(layout.run_stain_reference(cfg)) == reference
    for model in layout.model_folders(cfg):
        record = model.read_completion()
        assert record["stain_reference"] == reference.sha256 and record["features"]["stain_normalisation"] == "macenko"
    # stage 05: every test h5 was made with it; one made with another reference is not reused
    from ubc_ocean.inference.stage import reusable

    tests = sorted((layout.test_embeddings_root(cfg) / TEST).glob("*.h5"))
    assert len(tests) == len(competition_specs(cfg, TEST))
    assert all(embedding_cache.read_attrs(p)["stain_reference"] == reference.sha256 for p in tests)
    other = StainReference("macenko", reference.parameters, reference.tiles[:1], reference.torchstain_version)
    assert reusable(tests[0], False, {"stain_reference": reference.sha256})
    assert not reusable(tests[0], False, {"stain_reference": other.sha256})


def test_the_kaggle_bundle_carries_the_runs_reference(normalised, tmp_path):
    from ubc_ocean.kaggle import bundle as kaggle_bundle

    plan = kaggle_bundle._experiment_plan(normalised, normalised.experiment)
    kaggle_bundle._copy_experiment(plan, tmp_path)
    copied = tmp_path / "runs" / normalised.experiment / "stain_reference.json"
    assert copied.read_bytes() == layout.run_stain_reference(normalised).read_bytes()


def test_stage_05_refuses_a_run_without_its_reference_before_embedding(normalised, tmp_path):
    from ubc_ocean.inference.stage import run as infer

    cfg = _copy(Path(normalised.paths.data_root), tmp_path / "data")
    layout.run_stain_reference(cfg).unlink()
    shutil.rmtree(layout.test_embeddings_root(cfg) / TEST)
    with pytest.raises(ConfigError, match=r"stain_reference\.json is missing.*rerun stage 04"):
        infer(cfg)
    assert not list((layout.test_embeddings_root(cfg) / TEST).glob("*.h5"))
