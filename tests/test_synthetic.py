"""Stage 00: the synthetic UBC-OCEAN-shaped data set (layout, determinism, backgrounds, morphology)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import pyvips
from scipy import ndimage as ndi
from skimage.color import rgb2hed

from tests.builders import read_rgb, tiny_synthetic_config
from ubc_ocean.synthetic import generate, render_slide
from ubc_ocean.synthetic.generate import build_plan


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    cfg = tiny_synthetic_config(root)
    return cfg, generate(cfg)


def test_raw_layout_and_csv_columns(made):
    cfg, summary = made
    raw = Path(cfg.paths.raw)
    train = pd.read_csv(raw / "train.csv")
    test = pd.read_csv(raw / "test.csv")
    sub = pd.read_csv(raw / "sample_submission.csv")
    hidden = pd.read_csv(cfg.paths.hidden_test_labels)
    assert (raw / "train.csv").read_text().splitlines()[0] == "image_id,label,image_width,image_height,is_tma"
    assert (raw / "test.csv").read_text().splitlines()[0] == "image_id,image_width,image_height"
    assert list(sub.columns) == ["image_id", "label"]
    assert list(hidden.columns) == ["image_id", "label", "is_tma", "hospital"]
    assert train.is_tma.dtype == bool  # written as True/False
    assert len(train) == 10 and train.is_tma.sum() == 5
    assert sorted(train.label.unique()) == list(cfg.data.classes)
    assert len(test) == 6 and (hidden.label == "Other").sum() == 2 and hidden.is_tma.sum() == 3
    assert sorted(sub.image_id) == sorted(test.image_id) and sub.image_id.is_unique
    assert set(sub.label) == {"HGSC"}
    assert set(hidden.hospital) == {cfg.synthetic.train_hospitals}
    assert (raw / "config.yaml").is_file()
    assert summary["train"] == 10 and summary["test"] == 6


def test_ids_unique_across_all_sources(made):
    cfg, _ = made
    raw, ext = Path(cfg.paths.raw), Path(cfg.paths.external)
    tiff = pd.read_csv(ext / "synthetic_tiff" / "labels.csv")
    patches = pd.read_csv(ext / "synthetic_patches" / "labels.csv")
    ids = [
        *pd.read_csv(raw / "train.csv").image_id,
        *pd.read_csv(raw / "test.csv").image_id,
        *tiff.image_id,
        *patches.image_id.unique(),
    ]
    assert len(ids) == len(set(ids)) == 10 + 6 + 2 + 2
    assert all(isinstance(i, (int, np.integer)) for i in ids)


@pytest.mark.parametrize("split", ["train", "test"])
def test_pngs_sizes_backgrounds_and_thumbnails(made, split):
    cfg, _ = made
    raw = Path(cfg.paths.raw)
    table = pd.read_csv(raw / f"{split}.csv")
    if "is_tma" not in table:
        table = table.merge(pd.read_csv(cfg.paths.hidden_test_labels)[["image_id", "is_tma"]], on="image_id")
    for row in table.itertuples():
        image = pyvips.Image.new_from_file(str(raw / f"{split}_images" / f"{row.image_id}.png"))
        assert (image.width, image.height, image.bands, image.format) == (
            row.image_width, row.image_height, 3, "uchar",
        )  # fmt: skip
        corner = image.numpy()[0, 0]
        assert tuple(corner) == ((255, 255, 255) if row.is_tma else (0, 0, 0))
        thumb = raw / f"{split}_thumbnails" / f"{row.image_id}_thumbnail.png"
        assert thumb.exists() != bool(row.is_tma)
        if thumb.exists():
            small = pyvips.Image.new_from_file(str(thumb))
            assert max(small.width, small.height) == cfg.synthetic.thumbnail_max_side
            ratio = row.image_width / row.image_height
            assert abs(small.width / small.height - ratio) < 0.03 * ratio
    thumbs = {p.name for p in (raw / f"{split}_thumbnails").iterdir()}
    assert thumbs == {f"{i}_thumbnail.png" for i in table.image_id[~table.is_tma.astype(bool)]}


def test_external_tiffs_open_in_openslide_with_mpp(made):
    cfg, _ = made
    folder = Path(cfg.paths.external) / "synthetic_tiff"
    labels = pd.read_csv(folder / "labels.csv")
    assert list(labels.columns) == ["image_id", "file", "label"]
    assert list(labels.label) == ["CC", "EC"]
    for row in labels.itertuples():
        slide = openslide.OpenSlide(str(folder / row.file))
        try:
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
            assert slide.level_count > 1
            corner = np.asarray(slide.read_region((0, 0), 0, (4, 4)).convert("RGB"))
            assert corner.min() > 240  # white glass
        finally:
            slide.close()


def test_external_patches(made):
    cfg, summary = made
    folder = Path(cfg.paths.external) / "synthetic_patches"
    labels = pd.read_csv(folder / "labels.csv")
    assert list(labels.columns) == ["image_id", "file", "label"]
    assert len(labels) == 2 * 3 == summary["external_patches"]
    assert labels.groupby("image_id").size().tolist() == [3, 3]
    for row in labels.itertuples():
        rgb = read_rgb(folder / row.file)
        assert rgb.shape == (64, 64, 3)
        assert 25 < rgb.mean() < 240  # tissue, neither black fill nor glass


def test_rerun_skips_everything(made):
    cfg, _ = made
    png = next((Path(cfg.paths.raw) / "train_images").iterdir())
    before = png.stat().st_mtime_ns
    again = generate(cfg)
    assert again["written"] == 0 and again["skipped"] == 10 + 6 + 2 + 2
    assert png.stat().st_mtime_ns == before


def test_worker_count_does_not_change_output(made, tmp_path):
    cfg, _ = made
    other = tiny_synthetic_config(tmp_path, "synthetic.workers=2")
    generate(other)
    for name in ("train.csv", "test.csv", "sample_submission.csv"):
        assert (Path(cfg.paths.raw) / name).read_bytes() == (Path(other.paths.raw) / name).read_bytes()
    for png in (Path(cfg.paths.raw) / "train_images").iterdir():
        assert np.array_equal(read_rgb(png), read_rgb(Path(other.paths.raw) / "train_images" / png.name))


def test_plan_depends_on_seed(tmp_path):
    first = build_plan(tiny_synthetic_config(tmp_path))["train"]
    same = build_plan(tiny_synthetic_config(tmp_path))["train"]
    other = build_plan(tiny_synthetic_config(tmp_path, "synthetic.seed=1"))["train"]
    assert first.to_csv(index=False) == same.to_csv(index=False)
    assert first.to_csv(index=False) != other.to_csv(index=False)


def test_render_slide_is_deterministic():
    a, mask_a = render_slide("EC", 320, 240, False, 1, 123)
    b, mask_b = render_slide("EC", 320, 240, False, 1, 123)
    c, _ = render_slide("EC", 320, 240, False, 1, 124)
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("label", ["CC", "EC", "HGSC", "LGSC", "MC", "Other"])
@pytest.mark.parametrize("is_tma", [False, True])
def test_background_matches_tissue_mask(label, is_tma):
    width, height = (280, 280) if is_tma else (360, 260)
    rgb, mask = render_slide(label, width, height, is_tma, 2, 7)
    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
    assert mask.shape == (height, width) and mask.dtype == bool
    fill = 255 if is_tma else 0
    assert (rgb[~mask] == fill).all()
    assert not (rgb[mask] == fill).all(axis=1).any()  # no tissue pixel looks like background
    fraction = mask.mean()
    if is_tma:
        assert 0.45 < fraction < 0.7  # one core of diameter ~85% of the side: pi/4 * 0.85^2 = 0.57
    else:
        assert 0.25 < fraction < 0.7


def nuclear_stats(label: str, hospital: int = 1, seeds: range = range(3)) -> tuple[float, float]:
    """Fraction of tissue pixels that are hematoxylin-dark (nuclei) and their mean blob size in px."""
    fractions, sizes = [], []
    for seed in seeds:
        rgb, mask = render_slide(label, 560, 420, False, hospital, seed)
        nuclei = (rgb2hed(rgb)[..., 0] > 0.08) & mask
        count = ndi.label(nuclei)[1]
        fractions.append(nuclei.sum() / mask.sum())
        sizes.append(nuclei.sum() / max(count, 1))
    return float(np.mean(fractions)), float(np.mean(sizes))


def test_classes_differ_in_morphology():
    hgsc_fraction, hgsc_size = nuclear_stats("HGSC")
    for label in ("LGSC", "MC", "CC"):
        fraction, size = nuclear_stats(label)
        assert hgsc_fraction > 3 * fraction, label  # solid sheets of dark crowded nuclei
        assert hgsc_size > 2 * size, label  # large pleomorphic, often touching nuclei


def test_mucinous_glands_hold_blue_grey_mucin():
    def blue_share(label: str) -> float:
        rgb, mask = render_slide(label, 560, 420, False, 1, 3)
        px = rgb[mask].astype(int)
        return float(((px[:, 2] > px[:, 0] + 5) & (px[:, 1] > 150)).mean())

    assert blue_share("MC") > 0.03
    assert blue_share("MC") > 5 * max(blue_share("EC"), blue_share("HGSC"), 1e-3)


def test_invalid_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="test_other"):
        build_plan(tiny_synthetic_config(tmp_path, "synthetic.test_other=9"))


def test_unseen_test_hospital_has_a_clearly_different_stain():
    from ubc_ocean.synthetic.stain import hospital_stain

    def angle(u: np.ndarray, v: np.ndarray) -> float:
        return float(np.degrees(np.arccos(np.clip(u @ v, -1, 1))))

    train = [hospital_stain(h) for h in range(4)]
    unseen = hospital_stain(4)
    spread = max(angle(a.hema, b.hema) for a in train for b in train)
    assert min(angle(unseen.hema, t.hema) for t in train) > spread
    assert hospital_stain(2).hema.tolist() == hospital_stain(2).hema.tolist()  # seeded per hospital
