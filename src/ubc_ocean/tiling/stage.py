"""Stage 01: tile the training slides and the external sources into the keyed tile tile_store."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ubc_ocean import layout, tile_store
from ubc_ocean.config import save_config
from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.io_utils import FailureLog, atomic_path, clean_stale_temporaries
from ubc_ocean.parallel import TaskResult, run_tasks, select_shard, shard_output
from ubc_ocean.slides import SlideError
from ubc_ocean.slides.reader import InMemorySlide, resize_to
from ubc_ocean.sources import TRAIN, SlideSpec, competition_specs, external_slide_specs, external_sources
from ubc_ocean.tiling.cores import CoreSite, core_id, plan_cores
from ubc_ocean.tiling.masks import MaskError, TumourMap, read_tumour_map
from ubc_ocean.tiling.qc import save_overlay
from ubc_ocean.tiling.tiler import SlideTiler

log = logging.getLogger(__name__)
STAGE = "01_tile_slides"


@dataclass
class PatchBag:
    """A pseudo-slide of pre-cut patches from an external ``patches`` source."""

    source: str
    image_id: str
    label: str
    files: list[Path]
    magnification: float | None

    @property
    def slide_id(self) -> str:
        return f"{self.source}/{self.image_id}"


def _tile_record_row(record, name: str, tumour_fraction: float) -> dict:  # type: ignore[no-untyped-def]
    return {
        "file": name,
        "x": record.x,
        "y": record.y,
        "extent": record.extent,
        "magnification": record.magnification,
        "tissue_fraction": record.tissue_fraction,
        "blur_score": record.blur_score,
        tile_store.TUMOUR_FRACTION: tumour_fraction,
    }


def mask_facts(spec: SlideSpec, cfg: Mapping) -> dict | None:
    """The supplemental mask of a competition training slide as ``slide.json`` records it (file name and
    size), or None when it has none."""
    if spec.source != TRAIN:
        return None
    path = layout.supplemental_mask_path(cfg, spec.image_id)
    return {"file": path.name, "size": path.stat().st_size} if path.is_file() else None


def read_mask(spec: SlideSpec, cfg: Mapping, facts: dict | None, cores: bool = False) -> tuple[TumourMap | None,
                                                                                             dict | None]:
    """The slide's tumour map, its supplemental mask read once for the tiles' fractions and the cores' places,
    and the mask facts; a mask that cannot be read gives no map, a warning naming it and its problem in the
    facts (the tiles stay, with no tumour fraction; the cores, when ``cores``, go by tissue)."""
    if facts is None:
        return None, None
    try:
        return read_tumour_map(layout.supplemental_mask_path(cfg, spec.image_id)), facts
    except MaskError as err:
        log.warning("%s: %s; its tiles get no tumour fraction%s", spec.slide_id, err,
                    "; synthetic cores placed on tissue instead" if cores else "")
        return None, {**facts, "problem": str(err)}


def tumour_fractions(tumour_map: TumourMap | None, image_size: tuple[int, int], boxes: list[tuple[int, int]],
                     extent: int) -> list[float]:
    """Each box's tumour fraction from the slide's tumour map (NaN for every box without one)."""
    if tumour_map is None:
        return [float("nan")] * len(boxes)
    return [round(float(value), 4) for value in tumour_map.tile_fractions(image_size, boxes, extent)]


def _mask_key(facts: dict | None) -> tuple | None:
    """What decides whether recorded fractions are stale: the mask's file name and size."""
    return None if facts is None else (facts.get("file"), facts.get("size"))


def refresh_tumour_fractions(spec: SlideSpec, cfg: Mapping, folder: Path, facts: dict | None) -> int:
    """Rewrite a complete slide folder's tumour fractions (its mask appeared, changed or went) without
    tiling it again: only ``index.csv`` and ``slide.json`` change, each atomically; returns the tile count."""
    index, info = tile_store.read_index(folder), tile_store.read_slide_info(folder)
    boxes = list(zip(index["x"].astype(int), index["y"].astype(int), strict=True))
    extent = int(index["extent"].iloc[0]) if len(index) else 1
    tumour_map, facts = read_mask(spec, cfg, facts)
    tile_store.replace_tumour_fractions(folder, tumour_fractions(tumour_map, (int(info["width"]), int(info["height"])),
                                                            boxes, extent), facts)
    return len(index)


def _drain(tiler: SlideTiler, tmp: Path, settings: TilingSettings) -> list:
    """Drain ``tiler``'s pass into ``tmp``: the tiles the plan keeps and ``qc.png`` (the caller writes
    ``index.csv`` and ``slide.json``); returns the kept records."""
    records = []
    with tile_store.TileWriter(settings.format, settings.jpeg_quality) as writer:
        for record, rgb in tiler:
            writer.submit(tmp / tile_store.tile_file_name(record.x, record.y, settings.format), rgb)
            records.append(record)
    kept = tiler.finish(records)
    kept_boxes = {record.box for record in kept}
    for record in records:  # a streamed candidate that the tissue mask, known only now, leaves out goes
        if record.box not in kept_boxes:
            (tmp / tile_store.tile_file_name(record.x, record.y, settings.format)).unlink()
    if not kept:
        raise SlideError(tiler.info.no_tiles_message())
    save_overlay(tmp / tile_store.QC_FILE, tiler.qc_overlay(kept))
    return kept


def _write_index(tmp: Path, kept: list, fractions: list[float], settings: TilingSettings) -> None:
    tile_store.write_index(tmp, [
        _tile_record_row(record, tile_store.tile_file_name(record.x, record.y, settings.format), fraction)
        for record, fraction in zip(kept, fractions, strict=True)
    ])


def _tile_core(spec: SlideSpec, site: CoreSite, rgb, settings: TilingSettings, cfg: Mapping,  # type: ignore[no-untyped-def]
               ) -> dict | None:
    """Tile one core image as a TMA into its own folder (atomically; its tiles get no tumour fraction); its
    record for the parent's ``slide.json``, or None when it holds no tile."""
    core = SlideSpec(spec.source, core_id(spec.image_id, site.index), spec.path, is_tma=True,
                     magnification=float(settings.target_magnification), label=spec.label)
    folder = layout.slide_tiles_dir(cfg, core.source, core.image_id)
    try:
        with SlideTiler(core, settings, reader=InMemorySlide(spec.path, rgb)) as tiler, atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            kept = _drain(tiler, tmp, settings)
            _write_index(tmp, kept, [float("nan")] * len(kept), settings)
            tile_store.write_slide_info(tmp, {**tiler.info.to_dict(), "parent_image_id": spec.image_id,
                                         "parent_box": [site.x, site.y, site.side]}, core.magnification)
    except SlideError as err:
        log.warning("%s: synthetic core %d left out: %s", spec.slide_id, site.index, err)
        return None
    return {**site.record(spec.image_id), "n_tiles": len(kept)}


def tile_slide(spec: SlideSpec, cfg: Mapping) -> TaskResult:
    """Tile one slide into its folder (atomically); a complete folder cut with today's settings is skipped.

    With ``tiling.synthetic_tmas_per_wsi`` on, a WSI's synthetic cores are cut from the same decoding pass
    (a second one only when its tissue mask is built while streaming), each tiled into its own folder
    before the slide's, whose ``slide.json`` lists them (``synthetic_cores``): they are part of its
    complete output. They go where its supplemental mask shows most tumour, else most tissue."""
    settings = TilingSettings.from_config(cfg)
    folder = layout.slide_tiles_dir(cfg, spec.source, spec.image_id)
    facts = mask_facts(spec, cfg)
    if tile_store.is_current(folder, spec.magnification):
        if _mask_key(tile_store.recorded_mask(folder)) == _mask_key(facts):
            return TaskResult(spec.slide_id, "skipped")
        count = refresh_tumour_fractions(spec, cfg, folder, facts)
        return TaskResult(spec.slide_id, "done", "tumour fractions refreshed (its supplemental mask changed)",
                          count=count)
    try:
        with SlideTiler(spec, settings) as tiler, atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            wants_cores, cutter = settings.synthetic_tmas_per_wsi > 0 and not tiler.is_tma, None
            tumour_map, facts = read_mask(spec, cfg, facts, cores=wants_cores)
            if wants_cores and not tiler.streaming:
                cutter = plan_cores(tiler, settings, tumour_map)
                tiler.read_also(cutter.boxes, cutter.take)
            kept = _drain(tiler, tmp, settings)
            info = tiler.info
            fractions = tumour_fractions(tumour_map, (info.width, info.height), [record.box for record in kept],
                                         info.extent)
            _write_index(tmp, kept, fractions, settings)
            slide_facts = {**info.to_dict(), **tile_store.mask_fact(facts)}
            if wants_cores:
                if cutter is None:  # the mask came from the pass: the cores' cells are read again
                    cutter = plan_cores(tiler, settings, tumour_map)
                    for box, rgb in tiler.read_cells(cutter.boxes):
                        cutter.take(box, rgb)
                cores = [_tile_core(spec, site, rgb, settings, cfg) for site, rgb in cutter.images()]
                slide_facts[tile_store.CORES_KEY] = [core for core in cores if core is not None]
            tile_store.write_slide_info(tmp, slide_facts, spec.magnification)
    except (SlideError, OSError, ValueError) as err:
        return TaskResult(spec.slide_id, "failed", f"{spec.path.name}: {err}")
    fallback = tiler.info.fallback
    if fallback:
        log.warning("%s: fallback tiling (%s)", spec.slide_id, fallback)
    return TaskResult(spec.slide_id, "done", fallback, count=len(kept))


def ingest_patch_bag(bag: PatchBag, cfg: Mapping) -> TaskResult:
    """Copy a bag of pre-cut patches into the tile store at the target tile size, with an index."""
    tiling = cfg["tiling"]
    folder = layout.slide_tiles_dir(cfg, bag.source, bag.image_id)
    if tile_store.is_current(folder, bag.magnification):
        return TaskResult(bag.slide_id, "skipped")
    tile_size = int(tiling["tile_size"])
    target = float(tiling["target_magnification"])
    native = bag.magnification or target
    extent = max(1, round(tile_size * native / target))
    rows, unreadable = [], []
    try:
        with atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            for position, path in enumerate(bag.files):
                try:
                    rgb = tile_store.read_tile(path)
                except OSError:
                    unreadable.append(path.name)
                    continue
                rgb = resize_to(rgb[: min(rgb.shape[:2]), : min(rgb.shape[:2])], tile_size)
                x, y = position * extent, 0  # pre-cut patches carry no slide position: a pseudo row
                name = tile_store.tile_file_name(x, y, tiling["format"])
                tile_store.write_tile(tmp / name, rgb, tiling["format"], tiling["jpeg_quality"])
                rows.append({"file": name, "x": x, "y": y, "extent": extent, "magnification": target,
                             "tissue_fraction": 1.0, "blur_score": 0.0})
            if not rows:
                raise SlideError("no readable patch")
            tile_store.write_index(tmp, rows)
            tile_store.write_slide_info(tmp, {
                "source": bag.source, "image_id": bag.image_id, "label": bag.label, "is_tma": False,
                "native_magnification": native, "target_magnification": target, "extent": extent,
                "n_tiles": len(rows), "coords": "pseudo (pre-cut patches)", "unreadable": unreadable,
            }, bag.magnification)
    except (SlideError, OSError) as err:
        return TaskResult(bag.slide_id, "failed", str(err))
    message = f"{len(unreadable)} unreadable patches skipped" if unreadable else ""
    return TaskResult(bag.slide_id, "done", message, count=len(rows))


def patch_bags(source) -> list[PatchBag]:  # type: ignore[no-untyped-def]
    frame = source.labels()
    return [
        PatchBag(source.name, str(image_id), str(group["label"].iloc[0]),
                 [source.root / str(f) for f in group["file"]], source.magnification)
        for image_id, group in frame.groupby("image_id", sort=True)
    ]


def tiling_tasks(cfg: Mapping) -> list[SlideSpec | PatchBag]:
    """Every slide stage 01 handles: competition train images, external slides and patch bags."""
    tasks: list[SlideSpec | PatchBag] = list(competition_specs(cfg, TRAIN))
    for source in external_sources(cfg):
        tasks.extend(external_slide_specs(source) if source.kind == "slides" else patch_bags(source))
    return tasks


def _run_task(task: SlideSpec | PatchBag, cfg: Mapping) -> TaskResult:
    if isinstance(task, PatchBag):
        return ingest_patch_bag(task, cfg)
    return tile_slide(task, cfg)


def run(cfg: Mapping) -> dict:
    """Tile every training and external slide (this shard's share), resumably; returns the counts."""
    layout.require_writable(cfg, "interim")
    root = layout.tiles_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)
    shard = cfg["runtime"]["shard"]
    tasks = select_shard(tiling_tasks(cfg), shard, key=lambda task: task.slide_id)
    for source_dir in {root / task.source for task in tasks}:
        clean_stale_temporaries(source_dir)
    failures = FailureLog(shard_output(root, "failures.csv", shard), STAGE)
    failures.path.unlink(missing_ok=True)
    counts = {"done": 0, "skipped": 0, "failed": 0, "tiles": 0}
    worker = functools.partial(_run_task, cfg=cfg)
    for result in run_tasks(tasks, worker, workers=int(cfg["runtime"]["workers"]), desc="tiling"):
        counts[result.status] += 1
        counts["tiles"] += result.count
        if result.status == "failed":
            log.error("%s: %s", result.item, result.message)
            failures.record(result.item, result.message)
    log.info(
        "stage 01: %d slides done, %d skipped (already complete), %d failed, %d tiles -> %s",
        counts["done"], counts["skipped"], counts["failed"], counts["tiles"], root,
    )
    if counts["failed"]:
        log.info("failures listed in %s", failures.path)
    return counts

