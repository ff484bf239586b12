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
from ubc_ocean import layout
from ubc_ocean.config import ConfigError
from ubc_ocean.synthetic import generate, render_slide
from ubc_ocean.synthetic.generate import SlideLook, allocate, build_plan, render_slide_layers
from ubc_ocean.synthetic.scanner import Artefacts


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


def test_no_external_sources_writes_empty_labels_files(tmp_path):
    """Zero external TIFFs and patch slides: stage 00 still writes both labels files, with their header only."""
    cfg = tiny_synthetic_config(tmp_path, "synthetic.external_tiff_slides=0", "synthetic.external_patch_slides=0")
    summary = generate(cfg)
    assert (summary["external_tiff"], summary["external_patch_slides"]) == (0, 0)
    for folder in ("synthetic_tiff", "synthetic_patches"):
        labels = pd.read_csv(Path(cfg.paths.external) / folder / "labels.csv")
        assert list(labels.columns) == ["image_id", "file", "label"] and labels.empty


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


# ------------------------------------------------------------------------------------- hard benchmark keys

HARD_OVERRIDES = (
    "synthetic.train_images=12",
    "synthetic.train_tma_fraction=0.1",
    "synthetic.test_images=10",
    "synthetic.test_other=2",
    "synthetic.test_other_kinds=[stroma,near_hgsc]",
    "synthetic.test_class_mix=proportional",
    "synthetic.test_hospitals=2",
    "synthetic.test_stain_shift=1.0",
    "synthetic.morphology_overlap=0.5",
    "synthetic.tumour_share=[0.3,0.3]",
    "synthetic.mask_fraction=0.5",
    "synthetic.pen_probability=0.5",
    "synthetic.blur_probability=0.5",
    "synthetic.jpeg_probability=0.5",
    "synthetic.external_tiff_slides=1",
    "synthetic.external_patch_slides=1",
)


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    cfg = tiny_synthetic_config(root, *HARD_OVERRIDES)
    return cfg, generate(cfg), build_plan(cfg)


def test_allocate_keeps_the_total_the_proportions_and_the_minimum():
    real = [99, 124, 222, 47, 46]  # CC EC HGSC LGSC MC
    assert allocate(538, real) == real
    counts = allocate(80, real, minimum=1)
    assert sum(counts) == 80 and min(counts) >= 1
    assert counts.index(max(counts)) == 2 and counts[1] > counts[0] > counts[3] >= counts[4]
    assert allocate(3, real, minimum=1) == [1, 1, 1, 0, 0]  # too few for one each: largest remainders


def test_hard_plan_has_the_real_proportions_two_unseen_hospitals_and_other_kinds(hard):
    cfg, summary, plan = hard
    raw = Path(cfg.paths.raw)
    train = pd.read_csv(raw / "train.csv")
    hidden = pd.read_csv(cfg.paths.hidden_test_labels)
    counts = train.label.value_counts()
    assert [counts[c] for c in ("CC", "EC", "HGSC", "LGSC", "MC")] == allocate(12, [99, 124, 222, 47, 46], 1)
    assert train.is_tma.sum() == 1 and train[train.is_tma].label.item() == "HGSC"  # round(12 * 0.1), largest class
    assert list(hidden.columns) == ["image_id", "label", "is_tma", "hospital", "kind"]
    assert set(hidden.label) == {"CC", "EC", "HGSC", "LGSC", "MC", "Other"}  # every class, and Other
    tumour = hidden.label[hidden.label != "Other"].value_counts()
    assert [tumour[c] for c in ("CC", "EC", "HGSC", "LGSC", "MC")] == allocate(8, [99, 124, 222, 47, 46], 1)
    other = hidden[hidden.label == "Other"]
    assert sorted(other.kind) == ["other_near_hgsc", "other_stroma"]
    assert set(hidden.kind[hidden.label != "Other"]) == {"tumour"}
    test_hospitals = set(hidden.hospital)
    seen = set(plan["train"].hospital) | set(plan["tiff"].hospital) | set(plan["patches"].hospital)
    assert len(test_hospitals) == 2 and not test_hospitals & seen
    assert summary["test_hospitals"] == sorted(test_hospitals)


def test_supplemental_masks_mark_the_tumour_share_in_red(hard):
    cfg, summary, plan = hard
    train = plan["train"]
    wsis = train[~train.is_tma]
    assert train.has_mask.sum() == summary["supplemental_masks"] == round(0.5 * len(wsis))
    assert not train.has_mask[train.is_tma].any()
    folder = Path(cfg.paths.raw) / "train_supplemental_masks"
    assert {p.name for p in folder.iterdir()} == {f"{i}.png" for i in train.image_id[train.has_mask]}
    for image_id in train.image_id[train.has_mask]:
        mask = read_rgb(layout.supplemental_mask_path(cfg, image_id))
        image = read_rgb(Path(cfg.paths.raw) / "train_images" / f"{image_id}.png")
        assert mask.shape == image.shape
        red = (mask == (255, 0, 0)).all(axis=2)
        green = (mask == (0, 255, 0)).all(axis=2)
        black = (mask == 0).all(axis=2)
        assert (red | green | black).all()
        assert np.array_equal(red | green, image.max(axis=2) > 0)  # annotated = tissue (black WSI fill elsewhere)
        assert red.sum() / (red | green).sum() == pytest.approx(0.3, abs=0.06)  # synthetic.tumour_share


def test_a_missing_mask_is_written_again_without_rewriting_its_slide(hard):
    cfg, _, plan = hard
    image_id = plan["train"].image_id[plan["train"].has_mask].iloc[0]
    mask_path = layout.supplemental_mask_path(cfg, image_id)
    png = Path(cfg.paths.raw) / "train_images" / f"{image_id}.png"
    before, expected = png.stat().st_mtime_ns, read_rgb(mask_path)
    mask_path.unlink()
    again = generate(cfg)
    assert again["written"] == 1 and np.array_equal(read_rgb(mask_path), expected)
    assert png.stat().st_mtime_ns == before


def test_other_kinds_have_no_tumour_or_a_near_hgsc_one():
    from ubc_ocean.synthetic.morphology import OTHER_NEAR_HGSC, OTHER_STROMA

    _, tissue, tumour = render_slide_layers(OTHER_STROMA, 300, 300, True, 4, 1)
    assert tissue.sum() > 0 and not tumour.any()
    _, tissue, tumour = render_slide_layers(OTHER_NEAR_HGSC, 300, 300, True, 4, 1)
    assert 0.6 < tumour.sum() / tissue.sum() < 0.95


def test_overlap_pulls_the_nuclear_density_of_the_classes_together():
    def nuclear_share(label: str, overlap: float) -> float:
        look = SlideLook(overlap=overlap, tumour_share=0.9)
        rgb, _, tumour = render_slide_layers(label, 420, 320, False, 1, 3, look)
        return float(((rgb2hed(rgb)[..., 0] > 0.08) & tumour).sum() / tumour.sum())

    assert nuclear_share("HGSC", 0.0) > 3 * nuclear_share("CC", 0.0)  # crowded dark sheets vs clear cells
    assert nuclear_share("HGSC", 1.0) < 1.5 * nuclear_share("CC", 1.0)


def test_scanner_artefacts_blur_compress_and_ink_only_the_tissue():
    plain, tissue, _ = render_slide_layers("CC", 360, 280, False, 1, 9)
    looks = {
        "blur": SlideLook(artefacts=Artefacts(blur_sigma=2.0)),
        "jpeg": SlideLook(artefacts=Artefacts(jpeg_quality=20)),
        "pen": SlideLook(artefacts=Artefacts(pen_strokes=3)),
    }
    out = {name: render_slide_layers("CC", 360, 280, False, 1, 9, look)[0] for name, look in looks.items()}

    def sharpness(rgb: np.ndarray) -> float:
        return float(ndi.laplace(rgb.mean(axis=2))[ndi.binary_erosion(tissue, iterations=4)].var())

    assert sharpness(out["blur"]) < 0.3 * sharpness(plain)
    for rgb in out.values():
        assert (rgb[~tissue] == 0).all() and not np.array_equal(rgb, plain)
    diff = np.abs(out["jpeg"].astype(int) - plain.astype(int))[tissue]
    assert 1 < diff.mean() < 20  # block artefacts, the picture stays
    inked = (np.abs(out["pen"].astype(int) - plain.astype(int)).sum(axis=2) > 60) & tissue
    assert 0.002 < inked.mean() < 0.2
    assert np.array_equal(out["pen"][~inked], plain[~inked])


def test_test_hospitals_with_a_stain_shift_are_further_from_training():
    from ubc_ocean.synthetic.stain import hospital_stain

    def angle(u: np.ndarray, v: np.ndarray) -> float:
        return float(np.degrees(np.arccos(np.clip(u @ v, -1, 1))))

    train = [hospital_stain(h) for h in range(4)]
    spread = max(angle(a.hema, b.hema) for a in train for b in train)
    for hospital in (4, 7):  # the benchmark's two test hospitals
        shifted = hospital_stain(hospital, shift=1.0)
        assert min(angle(shifted.hema, t.hema) for t in train) > 2 * spread
    assert hospital_stain(7, 0.0).hema.tolist() == hospital_stain(7).hema.tolist()


@pytest.mark.parametrize(
    "override, key",
    [
        ("synthetic.tumour_share=[0.8,0.2]", "synthetic.tumour_share"),
        ("synthetic.test_other_kinds=[stroma,bogus]", "synthetic.test_other_kinds"),
        ("synthetic.jpeg_quality=[0,50]", "synthetic.jpeg_quality"),
        ("synthetic.test_class_mix=random", "synthetic.test_class_mix"),
    ],
)
def test_hard_keys_are_checked_when_the_config_loads(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        tiny_synthetic_config(tmp_path, override)
