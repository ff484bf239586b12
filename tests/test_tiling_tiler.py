"""The SlideTiler session: its contract (one pass, then finish, then info and the QC picture), the info
record in each reader mode, and finish's keep list when the tissue mask is built while streaming."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import pyvips

from tests.builders import tiny_config
from ubc_ocean import layout, tile_store
from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.slides import SlideError
from ubc_ocean.sources import SlideSpec
from ubc_ocean.synthetic import render_slide
from ubc_ocean.tiling.stage import tile_slide
from ubc_ocean.tiling.tiler import (
    MASK_FROM_VIEW,
    MASK_IN_MEMORY,
    MASK_STREAMED,
    SlideTiler,
    SlideTilingInfo,
    TileRecord,
    TilerUsageError,
)

WIDTH, HEIGHT = 960, 704
_FACTS = ["width", "height", "mpp", "is_tma", "native_magnification", "target_magnification", "extent", "reader",
          "mask_source"]
_PLAN = ["planned_tiles", "fallback"]
_REJECTED = ["rejected_blur", "rejected_artefact", "rejected_background"]
_SPEC_FACTS = ["source", "image_id", "label", "n_tiles", "path"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic 20x WSI as a PNG, and its thumbnail."""
    folder = tmp_path_factory.mktemp("tiler")
    rgb, _ = render_slide("MC", WIDTH, HEIGHT, is_tma=False, hospital=2, seed=9)
    png = folder / "slide.png"
    pyvips.Image.new_from_array(rgb).pngsave(str(png))
    thumbnail = folder / "slide_thumbnail.png"
    pyvips.Image.thumbnail(str(png), 240).pngsave(str(thumbnail))
    return png, thumbnail


def _setup(tmp_path: Path, slide: tuple[Path, Path], mode: str, *extra: str):
    png, thumbnail = slide
    cfg = tiny_config(tmp_path, "tiling.max_tiles_per_slide=0",
                      f"slides.in_memory_max_megapixels={64 if mode == 'in_memory' else 0}", *extra)
    spec = SlideSpec("t", mode, png, thumbnail=thumbnail if mode == "thumbnail" else None, is_tma=False,
                     competition_scale=True, label="MC")
    return cfg, spec, TilingSettings.from_config(cfg)


def _tile(spec: SlideSpec, settings: TilingSettings) -> tuple[list[TileRecord], list[TileRecord], SlideTilingInfo]:
    with SlideTiler(spec, settings) as tiler:
        records = [record for record, _ in tiler]
        kept = tiler.finish(records)
    return records, kept, tiler.info


def test_steps_out_of_order_are_errors_that_say_so(tmp_path, slide):
    _, spec, settings = _setup(tmp_path, slide, "thumbnail")
    with SlideTiler(spec, settings) as tiler:
        with pytest.raises(TilerUsageError, match="iterate the tiler to its end first"):
            tiler.finish([])
        with pytest.raises(TilerUsageError, match=r"only after finish\(\)"):
            tiler.info  # noqa: B018
        with pytest.raises(TilerUsageError, match=r"call finish\(\) first"):
            tiler.qc_overlay([])
        passes = iter(tiler)
        next(passes)
        with pytest.raises(TilerUsageError, match="reads its slide once"):
            iter(tiler)
        with pytest.raises(TilerUsageError, match="needs the whole pass"):  # left half-way
            tiler.finish([])
    with pytest.raises(TilerUsageError, match="closed"):
        iter(tiler)
    assert not issubclass(TilerUsageError, SlideError)  # a caller's bug is never recorded as a bad slide

    with SlideTiler(spec, settings) as tiler:
        records = [record for record, _ in tiler]
        with pytest.raises(TilerUsageError, match="did not yield"):
            tiler.finish([*records, dataclasses.replace(records[0], x=records[0].x + 1)])
        with pytest.raises(TilerUsageError, match="did not yield"):  # an equal copy is not a yielded record
            tiler.finish([dataclasses.replace(records[0])])
        kept = tiler.finish(records)
        with pytest.raises(TilerUsageError, match="already called"):
            tiler.finish(records)
        with pytest.raises(TilerUsageError, match="reads its slide once"):
            list(tiler)
    assert tiler.info.n_tiles == len(kept) and tiler.qc_overlay(kept).ndim == 3  # kept after close
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiler.info.n_tiles = 0  # type: ignore[misc]


def test_closing_half_way_stops_the_pass_and_releases_the_slide(tmp_path, slide):
    _, spec, settings = _setup(tmp_path, slide, "in_memory")
    tiler = SlideTiler(spec, settings)
    passes = iter(tiler)
    next(passes)
    tiler.close()
    tiler.close()  # twice is harmless
    assert list(passes) == [] and tiler.reader.rgb.size == 0


def test_a_slide_that_fails_to_open_is_closed_and_raises_a_slide_error(tmp_path, slide):
    _, spec, settings = _setup(tmp_path, slide, "in_memory")
    with pytest.raises(SlideError, match="size mismatch"):
        SlideTiler(dataclasses.replace(spec, expected_size=(WIDTH + 1, HEIGHT)), settings)


@pytest.mark.parametrize(("mode", "reader", "mask_source"), [
    ("thumbnail", "PngSlide", MASK_FROM_VIEW),
    ("in_memory", "InMemorySlide", MASK_IN_MEMORY),
    ("streamed", "PngSlide", MASK_STREAMED),
])
def test_info_record_in_each_reader_mode(tmp_path, slide, mode, reader, mask_source):
    cfg, spec, settings = _setup(tmp_path, slide, mode)
    records, kept, info = _tile(spec, settings)
    extent = settings.tile_size  # 20x slide, 20x target
    assert (info.source, info.image_id, info.label, info.path) == ("t", mode, "MC", str(spec.path))
    assert (info.width, info.height, info.mpp, info.is_tma) == (WIDTH, HEIGHT, None, False)
    assert (info.native_magnification, info.target_magnification, info.extent) == (20.0, 20.0, extent)
    assert (info.reader, info.mask_source, info.streaming) == (reader, mask_source, mode == "streamed")
    assert info.fallback == "" and info.quality_fallback_tiles == 0 and info.rejected_artefact == 0
    assert info.n_tiles == len(kept) > 5 and info.streamed_not_kept == len(records) - len(kept)
    if mode == "streamed":  # every foreground cell is a candidate; the plan, made after the pass, keeps some
        assert info.streamed_not_kept > 0 and info.rejected_background == 0
        assert info.planned_tiles >= info.n_tiles
    else:  # planned before reading: every planned tile is read, and kept unless its own pixels say otherwise
        assert info.streamed_not_kept == 0 and records == kept
        assert info.planned_tiles == info.n_tiles + info.rejected_background + info.rejected_blur
    # slide.json holds exactly these facts, in the order the tiler learns them (streaming plans last).
    plan_then_rejections = _REJECTED + _PLAN if mode == "streamed" else _PLAN + _REJECTED
    assert list(info.to_dict()) == [*_FACTS, *plan_then_rejections, "streamed_not_kept", *_SPEC_FACTS]
    assert tile_slide(spec, cfg).status == "done"
    folder = layout.slide_tiles_dir(cfg, spec.source, spec.image_id)
    assert tile_store.read_slide_info(folder) == {**info.to_dict(), "source_magnification": None}
    index = tile_store.read_index(folder)
    assert list(zip(index.x, index.y, strict=True)) == [record.box for record in kept]


def test_finish_keeps_the_streamed_candidates_the_plan_chose(tmp_path, slide):
    _, spec, settings = _setup(tmp_path, slide, "streamed")
    records, kept, info = _tile(spec, settings)
    assert all(math.isnan(record.tissue_fraction) for record in records)  # unknown while streaming
    by_box = {record.box: record for record in records}
    assert [record.box for record in kept] == [r.box for r in records if r.box in {k.box for k in kept}]
    for record in kept:  # the plan's fraction, nothing else changed
        assert record.tissue_fraction >= settings.min_tissue_fraction
        assert dataclasses.replace(record, tissue_fraction=math.nan) == dataclasses.replace(by_box[record.box],
                                                                                            tissue_fraction=math.nan)
    # The same slide planned on its own shrink (held in memory) keeps nearly the same tiles.
    _, in_memory, _ = _tile(*_setup(tmp_path / "mem", slide, "in_memory")[1:])
    ours, theirs = {record.box for record in kept}, {record.box for record in in_memory}
    assert len(ours & theirs) >= 0.9 * max(len(ours), len(theirs))
    # A cap applies to the plan: finish then keeps at most that many of the candidates.
    capped = dataclasses.replace(settings, max_tiles_per_slide=5)
    records, kept, info = _tile(spec, capped)
    assert len(kept) == info.planned_tiles == 5 and info.streamed_not_kept == len(records) - 5


@pytest.mark.parametrize("mode", ["thumbnail", "streamed"])
def test_quality_fallback_is_recorded(tmp_path, slide, mode):
    _, spec, settings = _setup(tmp_path, slide, mode, "tiling.min_blur_score=1e9", "tiling.quality_fallback_tiles=4")
    _, kept, info = _tile(spec, settings)
    # The reserve holds the 4 sharpest rejected tiles; when streaming, only those the plan (made after the
    # pass) finds on tissue are kept.
    assert len(kept) == info.quality_fallback_tiles == info.n_tiles
    assert len(kept) == 4 if mode == "thumbnail" else 0 < len(kept) <= 4
    assert "every tissue tile failed the quality filters" in info.fallback and info.rejected_blur > 4
    assert list(info.to_dict())[-7:-5] == ["quality_fallback_tiles", "streamed_not_kept"]
    lost = dataclasses.replace(settings, quality_fallback_tiles=0)
    _, kept, info = _tile(spec, lost)
    assert not kept and "failed the quality filters" in info.no_tiles_message()
    assert "quality_fallback_tiles" not in info.to_dict()


def test_an_all_background_slide_says_no_tissue(tmp_path):
    png = tmp_path / "blank.png"
    pyvips.Image.new_from_array(np.full((300, 400, 3), 250, np.uint8)).pngsave(str(png))
    cfg = tiny_config(tmp_path)
    _, kept, info = _tile(SlideSpec("t", "blank", png, is_tma=False, competition_scale=True),
                          TilingSettings.from_config(cfg))
    assert not kept and info.planned_tiles == 0 and "no tissue found" in info.no_tiles_message()
