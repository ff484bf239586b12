"""Synthetic TMA cores cut from training WSIs (tiling.synthetic_tmas_per_wsi): where they are cut (planted
dense tissue, planted tumour in a supplemental mask), what they look like (discs on white), and how the
pipeline treats them (ids, parents and labels in the manifest, the parent's fold, training-only bags)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.builders import LEAN, tiny_config, write_png
from ubc_ocean import layout, tile_store
from ubc_ocean.config import load_config
from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.encoders.identity import feature_width
from ubc_ocean.folds import TRAIN_ONLY, fold_split, is_synthetic, parent_folds
from ubc_ocean.slides.reader import resize_area
from ubc_ocean.sources import SlideSpec
from ubc_ocean.tiling.cores import TISSUE_MASK, TUMOUR_MASK, plan_cores
from ubc_ocean.tiling.stage import tile_slide
from ubc_ocean.tiling.tiler import SlideTiler

TILE, SIDE = 64, 192  # the tiny config's tile; cores of 3 x 3 cells
WIDTH, HEIGHT = 1024, 640  # a WSI of 16 x 10 whole cells
DENSE = (512, 64, 1024, 576)  # x0, y0, x1, y1: the planted dense block (cells 8-15 x 1-8)


def _tissue(shape: tuple[int, int], seed: int) -> np.ndarray:
    """H&E-like pink tissue with purple nuclei, never near black or white."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((*shape, 3), np.uint8)
    rgb[...] = (222, 150, 190)
    rgb = np.clip(rgb.astype(np.int16) + rng.integers(-18, 18, (*shape, 1)), 0, 255).astype(np.uint8)
    nuclei = rng.random(shape) < 0.04
    rgb[nuclei] = (110, 60, 150)
    return rgb


def _planted_wsi(dense_everywhere: bool = False) -> np.ndarray:
    """Black WSI fill; sparse tissue (64 px squares every 96 px: 44% of the area, above
    min_tissue_fraction) everywhere, and a block of solid tissue at ``DENSE`` (or solid tissue everywhere)."""
    rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    tissue = _tissue((HEIGHT, WIDTH), 1)
    if dense_everywhere:
        return tissue
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    sparse = ((yy % 96) < 64) & ((xx % 96) < 64)
    rgb[sparse] = tissue[sparse]
    x0, y0, x1, y1 = DENSE
    rgb[y0:y1, x0:x1] = tissue[y0:y1, x0:x1]
    return rgb


def _config(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return tiny_config(tmp_path / "data", "tiling.synthetic_tmas_per_wsi=2", f"tiling.synthetic_tma_side={SIDE}",
                       *extra)


def _spec(tmp_path: Path, rgb: np.ndarray, mode: str) -> SlideSpec:
    path = write_png(tmp_path / "raw" / "wsi.png", rgb)
    thumbnail = None
    if mode == "thumbnail":
        thumbnail = write_png(tmp_path / "raw" / "wsi_thumbnail.png", resize_area(rgb, WIDTH // 4, HEIGHT // 4))
    return SlideSpec("train", "wsi", path, thumbnail=thumbnail, is_tma=False, competition_scale=True, label="EC")


def _cores(cfg, spec: SlideSpec) -> list[dict]:  # type: ignore[no-untyped-def]
    result = tile_slide(spec, cfg)
    assert result.status == "done", result.message
    return tile_store.read_slide_info(layout.slide_tiles_dir(cfg, spec.source, spec.image_id))[tile_store.CORES_KEY]


def _inside(core: dict, box: tuple[int, int, int, int]) -> bool:
    cx, cy = core["x"] + core["side"] / 2, core["y"] + core["side"] / 2
    return box[0] <= cx < box[2] and box[1] <= cy < box[3]


@pytest.mark.parametrize("mode", ["thumbnail", "in_memory", "streaming"])
def test_cores_come_from_the_planted_dense_tissue_in_every_reading_mode(tmp_path, mode):
    cfg = _config(tmp_path, *(["slides.in_memory_max_megapixels=0"] if mode == "streaming" else []))
    spec = _spec(tmp_path, _planted_wsi(), mode)
    cores = _cores(cfg, spec)
    info = tile_store.read_slide_info(layout.slide_tiles_dir(cfg, "train", "wsi"))
    expected_mask = {"thumbnail": "low-resolution view", "in_memory": "the whole image, held in memory",
                     "streaming": "built in the decoding pass"}[mode]
    assert info["mask_source"] == expected_mask
    assert [core["image_id"] for core in cores] == ["wsi_core0", "wsi_core1"]
    for core in cores:
        assert _inside(core, DENSE), core
        assert core["density_source"] == TISSUE_MASK and core["density"] > 0.9 and core["side"] == SIDE
        folder = layout.slide_tiles_dir(cfg, "train", core["image_id"])
        facts = tile_store.read_slide_info(folder)
        assert facts["is_tma"] is True and facts["label"] == "EC" and facts["parent_image_id"] == "wsi"
        assert (facts["width"], facts["height"]) == (SIDE, SIDE) and facts["n_tiles"] == core["n_tiles"] > 0
        index = tile_store.read_index(folder)
        # Tiled as a TMA: the centred grid of the core's own image; only tiles on the disc (radius ~0.425 side)
        centres = np.hypot(index.x + TILE / 2 - SIDE / 2, index.y + TILE / 2 - SIDE / 2)
        assert (centres < 0.5 * SIDE).all()
    a, b = cores
    assert abs(a["x"] - b["x"]) >= SIDE or abs(a["y"] - b["y"]) >= SIDE  # never overlapping


def test_a_core_is_a_disc_of_the_slide_on_white(tmp_path):
    cfg = _config(tmp_path)
    rgb = _planted_wsi()
    spec = _spec(tmp_path, rgb, "in_memory")
    settings = TilingSettings.from_config(cfg)
    with SlideTiler(spec, settings) as tiler:
        cutter = plan_cores(tiler, settings)
        tiler.read_also(cutter.boxes, cutter.take)
        tiler.finish([record for record, _ in tiler])
        images = cutter.images()
    assert len(images) == 2
    yy, xx = np.mgrid[:SIDE, :SIDE]
    radius = np.hypot(yy + 0.5 - SIDE / 2, xx + 0.5 - SIDE / 2)
    for site, image in images:
        assert image.shape == (SIDE, SIDE, 3) and image.dtype == np.uint8
        white = (image == 255).all(axis=2)
        assert white[radius > 0.47 * SIDE].all()  # outside the disc: white (corners included)
        inner = radius < 0.38 * SIDE
        assert (~white[inner]).mean() > 0.97  # inside: the slide's dense tissue, pixel for pixel
        offset = (site.side - SIDE) // 2  # level-0 = target px here (20x)
        source = rgb[site.y + offset: site.y + offset + SIDE, site.x + offset: site.x + offset + SIDE]
        disc = ~white
        assert np.array_equal(image[disc], source[disc])
        ring = (radius > 0.30 * SIDE) & (radius < 0.47 * SIDE)
        assert 0.2 < white[ring].mean() < 0.9  # the edge lies in between, and is not a perfect circle


def test_cores_follow_the_tumour_of_a_supplemental_mask(tmp_path):
    cfg = _config(tmp_path)
    spec = _spec(tmp_path, _planted_wsi(dense_everywhere=True), "thumbnail")
    mask = np.zeros((HEIGHT // 4, WIDTH // 4, 3), np.uint8)  # downsampled 4x, as real masks may be
    mask[...] = (0, 200, 0)  # stroma
    tumour = (64, 192, 448, 576)  # level-0 box of red
    mask[tumour[1] // 4: tumour[3] // 4, tumour[0] // 4: tumour[2] // 4] = (220, 30, 30)
    write_png(layout.supplemental_mask_path(cfg, "wsi"), mask)
    cores = _cores(cfg, spec)
    assert len(cores) == 2
    for core in cores:
        assert _inside(core, tumour) and core["density_source"] == TUMOUR_MASK and core["density"] > 0.9, core


@pytest.mark.parametrize("mask", ["stroma only", "truncated"])
def test_a_mask_without_tumour_or_that_does_not_decode_falls_back_to_tissue(tmp_path, mask, caplog):
    cfg = _config(tmp_path)
    spec = _spec(tmp_path, _planted_wsi(), "thumbnail")
    path = write_png(layout.supplemental_mask_path(cfg, "wsi"), np.full((HEIGHT // 4, WIDTH // 4, 3), (0, 200, 0),
                                                                        np.uint8))
    if mask == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    cores = _cores(cfg, spec)
    assert len(cores) == 2 and all(_inside(c, DENSE) and c["density_source"] == TISSUE_MASK for c in cores)
    warned = "wsi.png: cannot read it" in caplog.text and "synthetic cores placed on tissue" in caplog.text
    assert warned == (mask == "truncated")


def test_default_zero_cuts_nothing_and_keeps_the_tiling_key(tmp_path):
    off, on = load_config(None), load_config(None, ["tiling.synthetic_tmas_per_wsi=1"])
    assert tile_store.tiling_key(off) != tile_store.tiling_key(on)
    side = load_config(None, ["tiling.synthetic_tma_side=999"])  # inert while the cores are off
    assert tile_store.tiling_key(side) == tile_store.tiling_key(off)
    cfg = tiny_config(tmp_path / "data")
    spec = _spec(tmp_path, _planted_wsi(), "thumbnail")
    assert tile_slide(spec, cfg).status == "done"
    assert tile_store.CORES_KEY not in tile_store.read_slide_info(layout.slide_tiles_dir(cfg, "train", "wsi"))
    assert sorted(p.name for p in layout.slide_tiles_dir(cfg, "train", "wsi").parent.iterdir()) == ["wsi"]


def test_a_slide_whose_core_folder_is_gone_is_tiled_again(tmp_path):
    cfg = _config(tmp_path)
    spec = _spec(tmp_path, _planted_wsi(), "thumbnail")
    cores = _cores(cfg, spec)
    assert tile_slide(spec, cfg).status == "skipped"
    store_dir = layout.slide_tiles_dir(cfg, "train", cores[1]["image_id"])
    for path in sorted(store_dir.iterdir()):
        path.unlink()
    store_dir.rmdir()
    assert tile_slide(spec, cfg).status == "done" and tile_store.is_complete(store_dir)


def test_fold_split_keeps_cores_with_their_parent_and_out_of_validation():
    frame = pd.DataFrame({
        "source": ["train"] * 5 + ["ext"],
        "image_id": ["a", "b", "a_core0", "a_core1", "b_core0", "e"],
        "parent_image_id": [None, None, "a", "a", "b", None],
    })
    folds = parent_folds(frame, pd.Series([0, 1, TRAIN_ONLY, TRAIN_ONLY, TRAIN_ONLY, TRAIN_ONLY]))
    assert folds.tolist() == [0, 1, 0, 0, 1, TRAIN_ONLY]
    table = frame.assign(fold=folds)
    train, valid = fold_split(table, 0)
    assert valid.image_id.tolist() == ["a"] and train.image_id.tolist() == ["b", "b_core0", "e"]
    with pytest.raises(ValueError, match="train/zz"):
        parent_folds(frame.assign(parent_image_id=[None, None, "zz", "a", "b", None]), folds)


# ------------------------------------------------------------------------------------ stages 01-04 with cores


@pytest.fixture(scope="module")
def cores_run(tiny_raw, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Stages 01-02 on the shared tiny raw data with two cores per WSI; stage 03 for one core (the encoder
    on CPU is the slow part) and known bags for the others (a class direction plus noise); stage 04 with
    one lean model, recording how many bags each fit trained and validated on."""
    from ubc_ocean import embedding_cache
    from ubc_ocean.external.stage import run as merge
    from ubc_ocean.features.stage import embed_slide
    from ubc_ocean.mil import stage as mil_stage
    from ubc_ocean.tiling.stage import run as tile

    root = tmp_path_factory.mktemp("cores") / "data"
    cfg = tiny_config(root, *LEAN, f"paths.raw={tiny_raw.paths.raw}", f"paths.external={tiny_raw.paths.external}",
                      "tiling.synthetic_tmas_per_wsi=2", "tiling.synthetic_tma_side=128")
    assert tile(cfg)["failed"] == 0
    merge(cfg)
    table = layout.read_training_table(cfg)
    embeddings = layout.embeddings_root(cfg)
    core = table[is_synthetic(table)].iloc[0]
    embedded = embed_slide(core.to_dict(), cfg, embeddings)
    assert embedded.status == "done", embedded.message
    rng = np.random.default_rng(0)
    classes = list(cfg.data.classes)
    width = feature_width(cfg)
    for row in table.itertuples():
        path = layout.embedding_path(embeddings, row.source, row.image_id)
        if not path.exists():
            features = rng.normal(size=(row.n_tiles, width)).astype(np.float32)
            features[:, classes.index(row.label)] += 3.0
            embedding_cache.write_embeddings(path, features, np.zeros((row.n_tiles, 2)), {})
    calls: list[tuple[int, int]] = []
    real_fit = mil_stage.fit

    def counting_fit(name, options, train_bags, train_labels, valid_bags, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((len(train_bags), len(valid_bags)))
        return real_fit(name, options, train_bags, train_labels, valid_bags, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mil_stage, "fit", counting_fit)
        mil_stage.run(cfg)
    return cfg, calls, core


def test_stage_03_embeds_a_core_like_any_slide(cores_run):
    from ubc_ocean import embedding_cache

    cfg, _, core = cores_run
    features, coords, attrs = embedding_cache.read_embeddings(
        layout.embedding_path(layout.embeddings_root(cfg), core.source, core.image_id))
    index = tile_store.read_index(layout.slide_tiles_dir(cfg, core.source, core.image_id))
    assert features.shape == (len(index), feature_width(cfg)) and np.isfinite(features).all()
    assert np.array_equal(coords, index[["x", "y"]].to_numpy()) and attrs["slide_id"] == core.slide_id


def test_stage_02_lists_each_core_with_its_parent_label_and_fold(cores_run):
    cfg, _, _ = cores_run
    table = layout.read_training_table(cfg)
    cores = table[is_synthetic(table)]
    real = table[~is_synthetic(table)].set_index(["source", "image_id"])
    wsis = real[~real.is_tma]
    assert len(cores) >= len(wsis)  # most WSIs have room for two 128 px cores
    assert set(zip(cores.source, cores.parent_image_id, strict=True)) <= set(wsis.index)
    for core in cores.itertuples():
        parent = real.loc[(core.source, core.parent_image_id)]
        assert core.image_id.startswith(f"{core.parent_image_id}_core")
        assert core.slide_id == f"{core.source}/{core.image_id}"
        assert core.label == parent.label and bool(core.is_tma) and core.fold == parent.fold
        assert core.provenance == f"{parent.provenance}:synthetic_core" and core.n_tiles > 0
    external = cores[cores.source != "train"]
    assert (external.fold == TRAIN_ONLY).all()  # an external slide's cores train only, as it does
    folds = pd.read_csv(layout.folds_path(cfg), dtype={"image_id": str, "parent_image_id": str})
    assert folds.parent_image_id.notna().sum() == len(cores)


def test_stage_04_trains_on_cores_and_validates_real_slides_only(cores_run):
    cfg, calls, _ = cores_run
    table = layout.read_training_table(cfg)
    synthetic = is_synthetic(table)
    folds = sorted(f for f in table.fold.unique() if f != TRAIN_ONLY)
    expected = [(int((table.fold != f).sum()), int(((table.fold == f) & ~synthetic).sum())) for f in folds]
    assert calls == expected
    assert all(train > int(((table.fold != f) & ~synthetic).sum()) for (train, _), f in zip(calls, folds, strict=True))
    oof = layout.model_dir(cfg, "abmil").read_oof()
    assert set(oof.slide_id) == set(table.slide_id[(table.fold >= 0) & ~synthetic])
    assert not oof.image_id.astype(str).str.contains("_core").any()
