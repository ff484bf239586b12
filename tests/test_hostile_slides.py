"""Hostile slides on real files (libvips and openslide decode them): thumbnails that cannot stand for their
image, images openslide refuses but libvips reads, greyscale images. Stage 01 and fused (stage 05) mode
share the tiler, so each case is checked in both where the two could differ."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest
import pyvips
import torch

from tests.builders import tiny_config, write_plain_tiff, write_png
from ubc_ocean import layout, tile_store
from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.encoders import create_encoder
from ubc_ocean.inference.fused import embed_slide_streaming
from ubc_ocean.slides import SlideError, open_slide
from ubc_ocean.slides.reader import aspect_mismatch
from ubc_ocean.sources import TEST, SlideSpec, competition_specs
from ubc_ocean.synthetic import render_slide
from ubc_ocean.tiling.stage import tile_slide
from ubc_ocean.tiling.tiler import MASK_FROM_VIEW, MASK_IN_MEMORY, MASK_STREAMED, SlideTiler
from ubc_ocean.tiling.tissue import INTENSITY, background_mask, is_colourless

WIDTH, HEIGHT = 960, 704
CPU = torch.device("cpu")
IN_MEMORY_MP = {"streamed": 0, "in_memory": 64}  # slides.in_memory_max_megapixels for each mask path
MASK_SOURCE = {"streamed": MASK_STREAMED, "in_memory": MASK_IN_MEMORY}
TILER_LOG = "ubc_ocean.tiling.tiler"


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("efficientnet_lite0", input_size=64)


@pytest.fixture(scope="module")
def wsi(tmp_path_factory) -> SimpleNamespace:
    """A synthetic 20x WSI as a PNG, its good thumbnail, and three thumbnails that cannot stand for it."""
    folder = tmp_path_factory.mktemp("hostile")
    rgb, _ = render_slide("MC", WIDTH, HEIGHT, is_tma=False, hospital=2, seed=9)
    png = write_png(folder / "slide.png", rgb)
    good = folder / "good_thumbnail.png"
    pyvips.Image.thumbnail(str(png), 240).pngsave(str(good))
    empty = folder / "empty_thumbnail.png"
    empty.write_bytes(b"")
    truncated = folder / "truncated_thumbnail.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    aspect = folder / "aspect_thumbnail.png"  # a square shrink of a 1.364:1 image, as 59031's 3000x2488
    pyvips.Image.thumbnail(str(png), 240, height=240, size="force").pngsave(str(aspect))
    return SimpleNamespace(rgb=rgb, png=png, good=good,
                           thumbnails={"empty": empty, "truncated": truncated, "aspect": aspect})


def _config(root: Path, mode: str = "in_memory", *extra: str):
    return tiny_config(root, "tiling.max_tiles_per_slide=0", f"slides.in_memory_max_megapixels={IN_MEMORY_MP[mode]}",
                       *extra)


def _tiled(cfg, spec: SlideSpec) -> tuple[pd.DataFrame, dict]:
    """Stage 01 on one slide: its index and slide.json."""
    result = tile_slide(spec, cfg)
    assert result.status == "done", result.message
    folder = layout.slide_tiles_dir(cfg, spec.source, spec.image_id)
    return tile_store.read_index(folder), tile_store.read_slide_info(folder)


def _warnings(caplog, slide_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == TILER_LOG and r.levelno == logging.WARNING and r.getMessage().startswith(f"{slide_id}:")]


# ------------------------------------------------------------------------------------------- thumbnails


@pytest.mark.parametrize("mode", ["streamed", "in_memory"])
@pytest.mark.parametrize(("kind", "why"), [("empty", "unreadable: empty file (0 bytes)"),
                                           ("truncated", "unreadable: "),
                                           ("aspect", "aspect 1.000 vs image 1.364")])
def test_an_unusable_thumbnail_gives_way_to_the_image_itself(tmp_path, wsi, caplog, kind, why, mode):
    """The tiles are those of the same image tiled without a thumbnail (never a stretched thumbnail's),
    slide.json says why, and a warning names the slide, the thumbnail and the reason."""
    cfg = _config(tmp_path, mode)
    plain = SlideSpec("train", "plain", wsi.png, is_tma=False, competition_scale=True)
    hostile = SlideSpec("train", kind, wsi.png, thumbnail=wsi.thumbnails[kind], is_tma=False, competition_scale=True)
    expected, plain_info = _tiled(cfg, plain)
    with caplog.at_level(logging.WARNING, logger=TILER_LOG):
        index, info = _tiled(cfg, hostile)
    pd.testing.assert_frame_equal(index, expected)  # same boxes, same tissue fractions, same files
    assert info["mask_source"] == plain_info["mask_source"] == MASK_SOURCE[mode]
    assert info["thumbnail_rejected"].startswith(why) and "thumbnail_rejected" not in plain_info
    assert list(info)[list(info).index("mask_source") + 1] == "thumbnail_rejected"
    [warning] = _warnings(caplog, f"train/{kind}")
    assert wsi.thumbnails[kind].name in warning and why in warning and MASK_SOURCE[mode] in warning


def test_a_good_thumbnail_is_still_used_and_the_tolerance_is_a_setting(tmp_path, wsi, caplog):
    cfg = _config(tmp_path)
    with caplog.at_level(logging.WARNING, logger=TILER_LOG):
        _, info = _tiled(cfg, SlideSpec("train", "good", wsi.png, thumbnail=wsi.good, is_tma=False,
                                        competition_scale=True))
    assert info["mask_source"] == MASK_FROM_VIEW and "thumbnail_rejected" not in info and not caplog.records
    # slides.thumbnail_aspect_tolerance reaches the reader: a loose one accepts the square thumbnail.
    spec = SlideSpec("train", "aspect", wsi.png, thumbnail=wsi.thumbnails["aspect"], is_tma=False,
                     competition_scale=True)
    loose = TilingSettings.from_config(_config(tmp_path, "in_memory", "slides.thumbnail_aspect_tolerance=0.5"))
    with SlideTiler(spec, loose) as tiler:
        assert tiler.mask_source == MASK_FROM_VIEW and tiler.reader.thumbnail_rejected == ""


def test_aspect_check_forgives_rounding_only():
    real = (48866, 47340)  # training image 59031, whose real thumbnail is 3000x2488
    assert aspect_mismatch((3000, 2488), real, 0.02)
    assert not aspect_mismatch((3000, 2906), real, 0.0)  # 2906.3 rounded: a true shrink, whatever the tolerance
    assert not aspect_mismatch((3000, 2907), real, 0.0)
    assert aspect_mismatch((3000, 2880), real, 0.0) and not aspect_mismatch((3000, 2880), real, 0.02)  # 0.9%
    assert aspect_mismatch((3000, 3000), real, 0.02)  # 3.1%
    assert not aspect_mismatch((64, 3), (60000, 3000), 0.0)  # 3.2 px rounded down: 6% off, but one pixel
    assert not aspect_mismatch((3, 64), (3000, 60000), 0.0)


def test_fused_mode_takes_the_image_path_for_a_zero_byte_test_thumbnail(tmp_path, wsi, encoder, caplog):
    """The issue's case: a good test image whose thumbnail is zero bytes is embedded, not failed, with the
    tiles stage 01 cuts from the image itself."""
    cfg = _config(tmp_path, "streamed")
    raw = Path(cfg.paths.raw)
    (raw / "test_images").mkdir(parents=True)
    (raw / "test_thumbnails").mkdir()
    shutil.copy(wsi.png, raw / "test_images" / "7001.png")
    (raw / "test_thumbnails" / "7001_thumbnail.png").write_bytes(b"")
    pd.DataFrame([{"image_id": 7001, "image_width": WIDTH, "image_height": HEIGHT}]).to_csv(raw / "test.csv",
                                                                                           index=False)
    [spec] = competition_specs(cfg, TEST)
    with caplog.at_level(logging.WARNING, logger=TILER_LOG):
        features, coords, info = embed_slide_streaming(spec, cfg, encoder, CPU)
    expected, _ = _tiled(cfg, SlideSpec("train", "plain", wsi.png, is_tma=False, competition_scale=True))
    assert coords.tolist() == expected[["x", "y"]].to_numpy().tolist() and len(features) == len(coords)
    assert info["thumbnail_rejected"] == "unreadable: empty file (0 bytes)" and info["mask_source"] == MASK_STREAMED
    assert len(_warnings(caplog, "test/7001")) == 1


# ---------------------------------------------------------------------------------- libvips-only images


@pytest.fixture(scope="module")
def kidney(tmp_path_factory) -> SimpleNamespace:
    """An RGB image of kidney-48-5.tif's size (1493x901) as a plain TIFF and as a PNG."""
    folder = tmp_path_factory.mktemp("plain_tiff")
    rgb, _ = render_slide("EC", 1493, 901, is_tma=False, hospital=0, seed=2)
    return SimpleNamespace(rgb=rgb, tif=write_plain_tiff(folder / "kidney-48-5.tif", rgb),
                           png=write_png(folder / "kidney-48-5.png", rgb))


@pytest.mark.parametrize(("mode", "reader"), [("in_memory", "InMemorySlide"), ("streamed", "VipsSlide")])
def test_a_plain_tiff_openslide_refuses_is_tiled_through_libvips(tmp_path, kidney, mode, reader):
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):  # what used to fail the slide
        openslide.OpenSlide(str(kidney.tif))
    cfg = _config(tmp_path, mode)
    index, info = _tiled(cfg, SlideSpec("ext", "kidney", kidney.tif, magnification=40, label="EC"))
    assert (info["reader"], info["mpp"], info["source_magnification"]) == (reader, None, 40)
    assert info["native_magnification"] == 40 and (index.extent == 2 * cfg.tiling.tile_size).all()
    # The same pixels as a PNG, at the same configured magnification: the same tiles.
    png_index, _ = _tiled(cfg, SlideSpec("ext", "kidney_png", kidney.png, magnification=40, label="EC"))
    pd.testing.assert_frame_equal(index, png_index)
    folder = layout.slide_tiles_dir(cfg, "ext", "kidney")
    x, y, extent = int(index.x[0]), int(index.y[0]), int(index.extent[0])
    expected = cv2.resize(kidney.rgb[y : y + extent, x : x + extent], (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(tile_store.read_tile(folder / index.file[0]).astype(int) - expected).mean() < 3  # JPEG tile


def test_a_plain_tiff_without_magnification_fails_saying_how_to_set_it(tmp_path, kidney):
    result = tile_slide(SlideSpec("ext", "kidney", kidney.tif), _config(tmp_path))
    assert result.status == "failed"
    assert "kidney-48-5.tif" in result.message and "set `magnification` on its external.sources" in result.message


def test_a_file_neither_library_reads_says_what_each_said(tmp_path):
    bad = tmp_path / "noise.tif"
    bad.write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(SlideError, match=r"openslide cannot open it: .*; libvips cannot open: "):
        open_slide(bad)


@pytest.mark.parametrize("name", ["strips.tif", "deflate.tiff", "photo.jpg"])
def test_libvips_images_stream_pixel_exact_top_to_bottom(tmp_path, name):
    """Boxes that straddle strips, rows skipped: every streamed box equals the decoded image's pixels."""
    rgb = np.random.default_rng(3).integers(0, 255, (700, 650, 3), dtype=np.uint8)
    path = tmp_path / name
    if name.endswith(".jpg"):
        pyvips.Image.new_from_array(rgb).jpegsave(str(path), Q=95)
    else:
        write_plain_tiff(path, rgb, **({"rows_per_strip": 33, "compression": "zlib"} if "deflate" in name else {}))
    pixels = pyvips.Image.new_from_file(str(path)).numpy()
    extent = 90
    boxes = [(x, y) for y in range(0, 700 - extent + 1, extent) for x in range(0, 650 - extent + 1, extent)]
    boxes = [(x, y) for i, (x, y) in enumerate(boxes) if i % 3 != 1 and (y // extent) % 4 != 2]
    with open_slide(path) as reader:
        assert type(reader).__name__ == "VipsSlide" and not reader.has_low_resolution_view
        got = list(reader.read_boxes(boxes, extent=extent, out_size=extent))
    assert [box for box, _ in got] == boxes
    for (x, y), tile in got:
        np.testing.assert_array_equal(tile, pixels[y : y + extent, x : x + extent])


def test_a_pyramidal_tiff_with_mpp_still_goes_through_openslide(tmp_path, kidney):
    tif = tmp_path / "pyramid.tif"
    pyvips.Image.new_from_array(kidney.rgb).tiffsave(str(tif), tile=True, tile_width=256, tile_height=256,
                                                     pyramid=True, compression="jpeg", Q=90, xres=2000.0,
                                                     yres=2000.0, resunit="cm")  # px/mm: 0.5 um/px
    index, info = _tiled(_config(tmp_path), SlideSpec("ext", "pyramid", tif, label="EC"))
    assert (info["reader"], info["mask_source"]) == ("OpenSlideSlide", MASK_FROM_VIEW)
    assert info["mpp"] == pytest.approx(0.5) and info["native_magnification"] == pytest.approx(20) and len(index)


# ----------------------------------------------------------------------------------------------- colour


@pytest.mark.parametrize(("is_tma", "mode"), [(False, "streamed"), (True, "in_memory")], ids=["wsi", "tma"])
def test_a_greyscale_image_is_tiled_by_intensity_and_says_so(tmp_path, caplog, encoder, is_tma, mode):
    """Greyscale H&E is an anomaly, but a test image must still get a prediction: its tissue is found by
    intensity (not the empty-mask fallback), on the tissue its colour original has; stage 01 and fused mode
    alike say so in slide.json and the log."""
    size = (512, 512) if is_tma else (WIDTH, HEIGHT)
    rgb, _ = render_slide("HGSC", *size, is_tma=is_tma, hospital=1, seed=4)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    paths = {"colour": write_png(tmp_path / "colour.png", rgb),
             "grey": write_png(tmp_path / "grey.png", grey),  # one band
             "grey_rgb": write_png(tmp_path / "grey_rgb.png", np.repeat(grey[..., None], 3, axis=2))}
    cfg = _config(tmp_path, mode)
    specs = {name: SlideSpec("train", name, path, is_tma=is_tma, competition_scale=True)
             for name, path in paths.items()}
    with caplog.at_level(logging.WARNING, logger=TILER_LOG):
        tiled = {name: _tiled(cfg, spec) for name, spec in specs.items()}
    colour_index, colour_info = tiled["colour"]
    assert "tissue_signal" not in colour_info and not _warnings(caplog, "train/colour")
    colour_boxes = set(zip(colour_index.x, colour_index.y, strict=True))
    for name in ("grey", "grey_rgb"):
        index, info = tiled[name]
        assert info["tissue_signal"] == INTENSITY and info["fallback"] == "" and info["n_tiles"] == len(index)
        boxes = set(zip(index.x, index.y, strict=True))
        assert len(boxes & colour_boxes) >= 0.9 * len(colour_boxes) and len(boxes) <= 1.3 * len(colour_boxes)
        [warning] = _warnings(caplog, f"train/{name}")
        assert "no colour" in warning and "intensity" in warning
    # Fused mode: the same tiles, the same record, the same warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=TILER_LOG):
        _, coords, info = embed_slide_streaming(specs["grey"], cfg, encoder, CPU)
        _, colour_coords, fused_colour_info = embed_slide_streaming(specs["colour"], cfg, encoder, CPU)
    grey_index, _ = tiled["grey"]
    assert coords.tolist() == grey_index[["x", "y"]].to_numpy().tolist()
    assert colour_coords.tolist() == colour_index[["x", "y"]].to_numpy().tolist()
    assert info["tissue_signal"] == INTENSITY and "tissue_signal" not in fused_colour_info
    assert len(_warnings(caplog, "train/grey")) == 1 and not _warnings(caplog, "train/colour")


def test_colourless_means_grey_up_to_compression_noise_never_pale_stain(tmp_path):
    settings = TilingSettings.from_config(_config(tmp_path))
    rgb, _ = render_slide("CC", 400, 300, is_tma=False, hospital=3, seed=1)

    def colourless(view: np.ndarray) -> bool:
        return is_colourless(view, ~background_mask(view, settings.black_value, settings.white_value))

    grey = np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    noisy = np.clip(grey.astype(int) + np.random.default_rng(0).integers(-4, 5, grey.shape), 0, 255).astype(np.uint8)
    faded = (255 - (255 - rgb.astype(int)) // 4).astype(np.uint8)  # a quarter of the stain: pale, still colour
    assert colourless(grey) and colourless(noisy)
    assert not colourless(rgb) and not colourless(faded)
    assert not colourless(np.zeros_like(rgb)) and not colourless(np.full_like(rgb, 250))  # no foreground at all


def test_16_bit_and_rgba_pngs_embed_like_their_original(tmp_path, wsi, encoder):
    """Neither is mistaken for greyscale: the same tiles and the same features as the 8-bit RGB original."""
    wide = wsi.rgb.astype(np.uint16) * 257
    paths = {"original": wsi.png, "rgba": write_png(tmp_path / "rgba.png", np.dstack([wsi.rgb, np.full(
        wsi.rgb.shape[:2], 255, np.uint8)])), "rgb16": tmp_path / "rgb16.png"}
    cv2.imwrite(str(paths["rgb16"]), wide[..., ::-1])
    cfg = _config(tmp_path, "in_memory", "tiling.max_tiles_per_slide=24")
    embedded = {name: embed_slide_streaming(SlideSpec("test", "7002", path, is_tma=False, competition_scale=True),
                                            cfg, encoder, CPU) for name, path in paths.items()}  # one id: one sample
    features, coords, _ = embedded["original"]
    for name in ("rgba", "rgb16"):
        other_features, other_coords, other_info = embedded[name]
        assert "tissue_signal" not in other_info and other_coords.tolist() == coords.tolist()
        np.testing.assert_allclose(other_features, features, atol=1e-5)
