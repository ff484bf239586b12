"""Stage 01 on real files: synthetic PNG WSIs and TMAs, TIFFs through openslide, bad inputs, resume, shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pyvips
import tifffile

from tests.builders import REPO, read_rgb, tiny_config, write_png
from ubc_ocean import layout, tile_store
from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.io_utils import clean_stale_temporaries
from ubc_ocean.sources import TEST, SlideSpec, competition_specs
from ubc_ocean.synthetic import render_slide
from ubc_ocean.tiling.grid import cell_fractions, grid_origin
from ubc_ocean.tiling.stage import run, tile_slide, tiling_tasks
from ubc_ocean.tiling.tiler import SlideTiler


def _tiles(cfg, spec) -> tuple[pd.DataFrame, dict, Path]:
    folder = layout.slide_tiles_dir(cfg, spec.source, spec.image_id)
    return tile_store.read_index(folder), tile_store.read_slide_info(folder), folder


@pytest.mark.parametrize("is_tma", [False, True], ids=["wsi", "tma"])
def test_tiles_lie_on_the_generators_tissue(tmp_path, is_tma):
    cfg = tiny_config(tmp_path)
    size = (512, 512) if is_tma else (900, 640)
    rgb, truth = render_slide("EC", *size, is_tma=is_tma, hospital=1, seed=3)
    spec = SlideSpec("t", "slide", write_png(tmp_path / "slide.png", rgb), is_tma=is_tma, competition_scale=True)
    result = tile_slide(spec, cfg)
    assert result.status == "done", result.message
    index, info, folder = _tiles(cfg, spec)
    tile = cfg.tiling.tile_size
    extent = 2 * tile if is_tma else tile  # TMAs are 40x: harmonised to 20x by a 2x downscale
    assert info["native_magnification"] == (40 if is_tma else 20) and (index["extent"] == extent).all()
    ox, oy = grid_origin(size[0], size[1], extent)  # the centred grid: margins split between opposite edges
    assert ox == (size[0] % extent) // 2 and oy == (size[1] % extent) // 2
    assert (((index.x - ox) % extent == 0) & ((index.y - oy) % extent == 0)).all()
    assert (index.x >= ox).all() and (index.y >= oy).all()
    assert (index.x + extent <= size[0] - ox).all() and (index.y + extent <= size[1] - oy).all()
    # Every kept tile is mostly tissue by the generator's own mask, and most tissue cells are kept.
    truth_fraction = cell_fractions(truth, size[0], size[1], extent)
    kept = truth_fraction[(index.y - oy) // extent, (index.x - ox) // extent]
    assert kept.min() >= 0.25 and kept.mean() >= 0.7
    tissue_cells = int((truth_fraction >= 0.9).sum())
    assert len(index) >= min(0.8 * tissue_cells, cfg.tiling.max_tiles_per_slide)
    first = tile_store.read_tile(folder / index.file[0])
    assert first.shape == (tile, tile, 3)
    assert (folder / "qc.png").is_file()


@pytest.mark.parametrize("metric", ["laplacian", "wavelet"])
def test_focus_threshold_drops_the_out_of_focus_half(tmp_path, metric):
    """The right half of a WSI is defocused: its tiles score far lower, and a threshold keeps only the left."""
    import cv2

    rgb, _ = render_slide("HGSC", 900, 640, is_tma=False, hospital=0, seed=5)
    rgb[:, 448:] = cv2.GaussianBlur(np.ascontiguousarray(rgb[:, 448:]), (0, 0), 3)
    path = write_png(tmp_path / "half_blurred.png", rgb)
    cfg = tiny_config(tmp_path / "all", f"tiling.blur_metric={metric}", "tiling.max_tiles_per_slide=0")
    spec = SlideSpec("t", "half", path, is_tma=False, competition_scale=True)
    assert tile_slide(spec, cfg).status == "done"
    index, _, _ = _tiles(cfg, spec)
    extent = int(index.extent[0])
    sharp, blurred = index[index.x + extent <= 448], index[index.x >= 448]
    assert len(sharp) >= 10 and len(blurred) >= 10
    assert sharp.blur_score.min() > 3 * blurred.blur_score.max()
    threshold = float(np.sqrt(sharp.blur_score.min() * blurred.blur_score.max()))
    strict = tiny_config(tmp_path / "strict", f"tiling.blur_metric={metric}", "tiling.max_tiles_per_slide=0",
                         f"tiling.min_blur_score={threshold}")
    assert tile_slide(spec, strict).status == "done"
    kept, _, _ = _tiles(strict, spec)
    assert (kept.x < 448).all() and len(kept) >= len(sharp)


@pytest.mark.parametrize("mode", ["thumbnail", "in_memory", "streamed"])
def test_wholly_defocused_slide_keeps_its_sharpest_tiles_not_nothing(tmp_path, mode):
    """Every tissue tile fails the blur filter: the slide keeps its sharpest tiles and says so, else fails
    with the filters named, not as 'no tissue'."""
    import cv2

    rgb, _ = render_slide("CC", 900, 640, is_tma=False, hospital=1, seed=7)
    png = write_png(tmp_path / "defocused.png", cv2.GaussianBlur(rgb, (0, 0), 3))
    thumbnail = None
    if mode == "thumbnail":
        thumbnail = tmp_path / "defocused_thumbnail.png"
        pyvips.Image.thumbnail(str(png), 225).pngsave(str(thumbnail))
    spec = SlideSpec("t", mode, png, thumbnail=thumbnail, is_tma=False, competition_scale=True)
    common = ("tiling.max_tiles_per_slide=0", f"slides.in_memory_max_megapixels={64 if mode == 'in_memory' else 0}")
    plain = tiny_config(tmp_path / "plain", *common)
    assert tile_slide(spec, plain).status == "done"
    everything, _, _ = _tiles(plain, spec)
    assert len(everything) > 5
    strict = tiny_config(tmp_path / "strict", *common, "tiling.min_blur_score=1e9", "tiling.quality_fallback_tiles=5")
    result = tile_slide(spec, strict)
    assert result.status == "done" and "failed the quality filters" in result.message
    kept, info, folder = _tiles(strict, spec)
    sharpest = everything.nlargest(5, "blur_score")
    assert set(zip(kept.x, kept.y, strict=True)) == set(zip(sharpest.x, sharpest.y, strict=True))
    assert info["quality_fallback_tiles"] == 5 and info["rejected_blur"] >= len(everything)
    assert sorted(p.name for p in folder.glob("*.jpg")) == sorted(kept.file)
    assert kept.tissue_fraction.between(strict.tiling.min_tissue_fraction, 1).all()
    lost = tiny_config(tmp_path / "lost", *common, "tiling.min_blur_score=1e9", "tiling.quality_fallback_tiles=0")
    failed = tile_slide(spec, lost)
    assert failed.status == "failed" and "failed the quality filters" in failed.message
    assert "no tissue" not in failed.message


def test_image_smaller_than_one_tile_fails_saying_so(tmp_path):
    cfg = tiny_config(tmp_path)
    extent = 2 * cfg.tiling.tile_size  # a TMA at 40x
    rgb, _ = render_slide("EC", extent - 1, extent - 1, is_tma=True, hospital=0, seed=1)
    spec = SlideSpec("t", "tiny", write_png(tmp_path / "tiny.png", rgb), is_tma=True, competition_scale=True)
    result = tile_slide(spec, cfg)
    assert result.status == "failed" and "smaller than one tile" in result.message and "40x" in result.message


def test_external_tiff_with_mpp_and_without(tiny_raw, tmp_path):
    """Pyramidal TIFFs go through openslide; mpp sets the scale, else the source's magnification, else error."""
    labels = pd.read_csv(Path(tiny_raw.paths.external) / "synthetic_tiff" / "labels.csv")
    tiff = Path(tiny_raw.paths.external) / "synthetic_tiff" / labels.file[0]
    cfg = tiny_config(tmp_path)
    spec = SlideSpec("tiff", "with_mpp", tiff)
    assert tile_slide(spec, cfg).status == "done"
    _, info, _ = _tiles(cfg, spec)
    assert info["mpp"] == pytest.approx(0.5) and info["native_magnification"] == pytest.approx(20)
    # The same pixels in a tiled TIFF without resolution tags: openslide reports no mpp.
    bare = tmp_path / "bare.tiff"
    pixels = read_rgb(tiff)
    tifffile.imwrite(bare, pixels, tile=(256, 256), photometric="rgb", compression="zlib")
    failed = tile_slide(SlideSpec("tiff", "no_mpp", bare), cfg)
    assert failed.status == "failed" and "no magnification" in failed.message and "bare.tiff" in failed.message
    assert tile_slide(SlideSpec("tiff", "no_mpp_40x", bare, magnification=40), cfg).status == "done"
    index, info, _ = _tiles(cfg, SlideSpec("tiff", "no_mpp_40x", bare))
    assert info["native_magnification"] == 40 and (index.extent == 2 * cfg.tiling.tile_size).all()


def _bad_inputs_raw(root: Path) -> dict[str, str]:
    """A raw folder whose train.csv lists one good slide and one of each kind of bad input."""
    images = root / "raw" / "train_images"
    good, _ = render_slide("HGSC", 640, 480, is_tma=False, hospital=0, seed=1)
    write_png(images / "1.png", good)
    payload = (write_png(images / "2.png", good)).read_bytes()
    (images / "2.png").write_bytes(payload[: len(payload) // 2])  # truncated
    write_png(images / "4.png", good)                                   # CSV gives the wrong size
    write_png(images / "5.png", np.zeros((480, 640, 3), np.uint8))      # all black
    write_png(images / "6.png", np.full((480, 640, 3), 250, np.uint8))  # blank glass: zero tissue
    rows = [(1, 640, 480), (2, 640, 480), (3, 640, 480), (4, 600, 480), (5, 640, 480), (6, 640, 480)]
    pd.DataFrame([{"image_id": i, "label": "HGSC", "image_width": w, "image_height": h, "is_tma": False}
                  for i, w, h in rows]).to_csv(root / "raw" / "train.csv", index=False)
    return {"train/2": "2.png: truncated or corrupt", "train/3": "file not found", "train/4": "size mismatch",
            "train/5": "no tissue", "train/6": "no tissue"}


def test_bad_inputs_are_recorded_and_the_run_goes_on(tmp_path):
    expected = _bad_inputs_raw(tmp_path)
    cfg = tiny_config(tmp_path, "external.sources=[]", "runtime.workers=2")  # two processes
    counts = run(cfg)
    assert counts == {"done": 1, "skipped": 0, "failed": 5, "tiles": counts["tiles"]} and counts["tiles"] > 0
    failures = layout.read_tiling_failures(cfg).set_index("slide")
    assert set(failures.index) == set(expected)
    for slide, words in expected.items():
        assert words in failures.loc[slide, "message"], failures.loc[slide, "message"]
    assert (failures.stage == "01_tile_slides").all()
    assert tile_store.is_complete(layout.slide_tiles_dir(cfg, "train", "1"))
    assert not layout.slide_tiles_dir(cfg, "train", "2").exists()  # nothing half-written
    # A rerun skips the good slide and retries (and again records) the bad ones.
    again = run(cfg)
    assert (again["done"], again["skipped"], again["failed"]) == (0, 1, 5)
    assert len(layout.read_tiling_failures(cfg)) == 5


KILLABLE = """
import sys, time
from pathlib import Path
from tests.builders import tiny_config
from ubc_ocean.sources import SlideSpec
from ubc_ocean import tile_store
from ubc_ocean.tiling.stage import tile_slide
original = tile_store.write_tile
def slow_write(*args):
    original(*args)
    time.sleep(0.2)
tile_store.write_tile = slow_write
cfg = tiny_config(Path(sys.argv[1]))
tile_slide(SlideSpec("t", "slide", Path(sys.argv[2]), is_tma=False, competition_scale=True), cfg)
"""


def test_slide_killed_half_way_is_redone_never_left_complete(tmp_path):
    rgb, _ = render_slide("CC", 900, 640, is_tma=False, hospital=0, seed=5)
    png = write_png(tmp_path / "slide.png", rgb)
    cfg = tiny_config(tmp_path)
    folder = layout.slide_tiles_dir(cfg, "t", "slide")
    child = subprocess.Popen([sys.executable, "-c", KILLABLE, str(tmp_path), str(png)],
                             cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and not list(folder.parent.glob(".tmp-slide@*/*.jpg")):
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert list(folder.parent.glob(".tmp-slide@*")), "the child should have died mid-slide"
    assert not folder.exists() and not tile_store.is_complete(folder)
    assert clean_stale_temporaries(folder.parent) == 1  # what stage 01 does first in every source folder
    spec = SlideSpec("t", "slide", png, is_tma=False, competition_scale=True)
    assert tile_slide(spec, cfg).status == "done"
    assert tile_store.is_complete(folder) and not list(folder.parent.glob(".tmp-*"))
    # The resumed slide is byte for byte what an uninterrupted run writes.
    clean = tiny_config(tmp_path / "clean")
    assert tile_slide(spec, clean).status == "done"
    resumed, uninterrupted = ({p.name: p.read_bytes() for p in f.iterdir()}
                              for f in (folder, layout.slide_tiles_dir(clean, "t", "slide")))
    assert resumed == uninterrupted and len(resumed) > 4  # tiles, index, slide.json, QC picture


def test_shards_partition_the_slides(tiny_raw, tmp_path):
    shared = [f"paths.raw={tiny_raw.paths.raw}", f"paths.external={tiny_raw.paths.external}"]
    done = []
    for shard in ("0/3", "1/3", "2/3"):
        cfg = tiny_config(tmp_path, *shared, f"runtime.shard={shard}")
        assert run(cfg)["failed"] == 0
        complete = {f"{p.parent.name}/{p.name}" for p in layout.tiles_root(cfg).glob("*/*")
                    if tile_store.is_complete(p)}
        done.append(complete - set().union(*done))  # what this shard added
    everything = tiny_config(tmp_path, *shared)
    expected = {task.slide_id for task in tiling_tasks(everything)}
    assert set().union(*done) == expected
    assert sum(len(d) for d in done) == len(expected) and all(done)
    assert run(everything)["skipped"] == len(expected)
    # The default tissue settings find tissue on every synthetic slide without falling back.
    infos = [tile_store.read_slide_info(p) for p in layout.tiles_root(everything).glob("*/*")]
    assert infos and not [i["image_id"] for i in infos if i.get("fallback")]


def test_defaults_find_tissue_on_every_test_image(tiny_raw):
    settings = TilingSettings.from_config(tiny_raw)
    for spec in competition_specs(tiny_raw, TEST):
        with SlideTiler(spec, settings) as tiler:  # TMAs have no thumbnail: held in memory
            kept = tiler.finish([record for record, _ in tiler])
        assert tiler.info.planned_tiles > 0 and not tiler.info.fallback, spec.slide_id
        assert kept, spec.slide_id


@pytest.mark.parametrize(("in_memory_mp", "mask_source"), [(0, "built in the decoding pass"),
                                                           (64, "the whole image, held in memory")],
                         ids=["streamed", "in_memory"])
def test_png_without_thumbnail_is_decoded_once_and_matches_thumbnail_tiling(tmp_path, monkeypatch, in_memory_mp,
                                                                          mask_source):
    rgb, _ = render_slide("MC", 960, 704, is_tma=False, hospital=2, seed=9)
    png = write_png(tmp_path / "slide.png", rgb)
    thumb = tmp_path / "slide_thumbnail.png"
    pyvips.Image.thumbnail(str(png), 240).pngsave(str(thumb))
    cfg = tiny_config(tmp_path, "tiling.max_tiles_per_slide=0", f"slides.in_memory_max_megapixels={in_memory_mp}")
    with_thumb = SlideSpec("a", "thumb", png, thumbnail=thumb, is_tma=False, competition_scale=True)
    assert tile_slide(with_thumb, cfg).status == "done"
    # Without a thumbnail the mask must come from the one decoding pass: a second decode would fail here.
    monkeypatch.setattr(pyvips.Image, "thumbnail", lambda *a, **k: pytest.fail("second decoding pass"))
    decodes = []
    real_open = pyvips.Image.new_from_file
    monkeypatch.setattr(pyvips.Image, "new_from_file", lambda *a, **k: decodes.append(a) or real_open(*a, **k))
    streamed = SlideSpec("a", "streamed", png, is_tma=False, competition_scale=True)
    assert tile_slide(streamed, cfg).status == "done"
    a, _, _ = _tiles(cfg, with_thumb)
    b, info, folder = _tiles(cfg, streamed)
    boxes_a, boxes_b = set(zip(a.x, a.y, strict=True)), set(zip(b.x, b.y, strict=True))
    assert len(boxes_a & boxes_b) >= 0.9 * max(len(boxes_a), len(boxes_b))
    assert info["mask_source"] == mask_source
    assert len(decodes) == 2  # the header, then one decoding pass
    assert sorted(p.name for p in folder.glob("*.jpg")) == sorted(b.file)  # pruned candidates are gone
    assert b.tissue_fraction.between(cfg.tiling.min_tissue_fraction, 1).all()
    if in_memory_mp:  # planned before cutting: no candidate was cut only to be thrown away
        assert info["streamed_not_kept"] == 0 and info["planned_tiles"] == len(b)
    else:
        assert info["streamed_not_kept"] > 0
