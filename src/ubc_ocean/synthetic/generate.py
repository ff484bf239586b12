"""Stage 00: a seeded, UBC-OCEAN-shaped raw folder (train/test CSVs, PNGs, thumbnails) plus two external
sources (pyramidal TIFFs with mpp; pre-cut patch folders) and the hidden test labels for scoring demos.

Every slide is seeded from (synthetic.seed, image_id), so the output does not depend on the worker count;
slides already on disk are skipped, and every file is written to a temporary name and then renamed.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyvips

from ubc_ocean.config import Config, save_config
from ubc_ocean.io_utils import atomic_path, atomic_write_csv, clean_stale_temporaries
from ubc_ocean.parallel import TaskResult, run_tasks
from ubc_ocean.synthetic.morphology import CLASSES, OUTLIER, render_morphology, tma_core_mask, wsi_tissue_mask
from ubc_ocean.synthetic.stain import hospital_stain

log = logging.getLogger(__name__)

TIFF_MPP = 0.5  # microns per pixel at 20x
TIFF_DIR = "synthetic_tiff"
PATCH_DIR = "synthetic_patches"
PNG_COMPRESSION = 2  # zlib level: fast, files a little larger


def slide_seed(seed: int, image_id: int) -> int:
    """The per-slide seed derived from the global seed and the image id."""
    return int(np.random.SeedSequence([int(seed), int(image_id)]).generate_state(1)[0])


def _render(
    label: str, width: int, height: int, is_tma: bool, hospital: int, seed: int, full_tissue: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    mask_rng, tissue_rng, stain_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    if full_tissue:
        mask = np.ones((height, width), bool)
    elif is_tma:
        if width != height:
            raise ValueError(f"TMAs are square, got {width}x{height}")
        mask = tma_core_mask(mask_rng, width)
    else:
        mask = wsi_tissue_mask(mask_rng, height, width)
    background = 255 if is_tma else 0
    rgb = np.full((height, width, 3), background, np.uint8)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return rgb, mask
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    inner = mask[box]
    maps = render_morphology(label, inner.shape, 2.0 if is_tma else 1.0, tissue_rng, tissue=inner)
    tissue = hospital_stain(hospital).jittered(stain_rng).to_rgb(maps)
    if is_tma:
        np.minimum(tissue, 254, out=tissue)  # tissue is never pure white, background always is
    np.copyto(rgb[box], tissue, where=inner[..., None])
    return rgb, mask


def render_slide(
    label: str, width: int, height: int, is_tma: bool, hospital: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render one slide: (rgb uint8 [H, W, 3], tissue mask bool [H, W]).

    WSIs (20x) have black (0, 0, 0) background, TMAs (40x, all length scales doubled, square) white.
    """
    return _render(label, width, height, is_tma, hospital, seed)


# ------------------------------------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class SlideJob:
    """One unit of work for a worker process: a PNG (+ thumbnail), a pyramidal TIFF or a patch folder."""

    kind: str  # png | tiff | patches
    image_id: int
    label: str
    width: int
    height: int
    is_tma: bool
    hospital: int
    seed: int
    out: str
    thumbnail: str = ""
    thumbnail_max_side: int = 0
    patch_size: int = 0
    n_patches: int = 0


def _vips(rgb: np.ndarray) -> pyvips.Image:
    return pyvips.Image.new_from_array(rgb, interpretation="srgb")


def _save_thumbnail(source: pyvips.Image, path: str, max_side: int) -> None:
    thumb = source.thumbnail_image(max_side, height=max_side, size="both")
    with atomic_path(path) as tmp:
        thumb.pngsave(str(tmp), compression=PNG_COMPRESSION)


def _write_png_job(job: SlideJob) -> TaskResult:
    out = Path(job.out)
    thumb_missing = bool(job.thumbnail) and not Path(job.thumbnail).exists()
    if out.exists():
        if thumb_missing:
            _save_thumbnail(pyvips.Image.new_from_file(str(out)), job.thumbnail, job.thumbnail_max_side)
            return TaskResult(str(job.image_id), "done", "thumbnail only")
        return TaskResult(str(job.image_id), "skipped")
    rgb, _ = render_slide(job.label, job.width, job.height, job.is_tma, job.hospital, job.seed)
    image = _vips(rgb)
    if job.thumbnail:
        _save_thumbnail(image, job.thumbnail, job.thumbnail_max_side)
    with atomic_path(out) as tmp:
        image.pngsave(str(tmp), compression=PNG_COMPRESSION)
    return TaskResult(str(job.image_id), "done", count=1)


def _write_tiff_job(job: SlideJob) -> TaskResult:
    out = Path(job.out)
    if out.exists():
        return TaskResult(str(job.image_id), "skipped")
    rgb, mask = render_slide(job.label, job.width, job.height, False, job.hospital, job.seed)
    rgb[~mask] = 255  # scanned glass is white
    res = 1000.0 / TIFF_MPP  # pixels per mm; pyvips converts for resunit="cm"
    with atomic_path(out) as tmp:
        _vips(rgb).tiffsave(
            str(tmp), tile=True, tile_width=256, tile_height=256, pyramid=True,
            compression="jpeg", Q=90, xres=res, yres=res, resunit="cm",
        )  # fmt: skip
    return TaskResult(str(job.image_id), "done", count=1)


def _write_patch_job(job: SlideJob) -> TaskResult:
    out = Path(job.out)
    if out.is_dir():
        return TaskResult(str(job.image_id), "skipped")
    cols = math.ceil(math.sqrt(job.n_patches))
    rows = math.ceil(job.n_patches / cols)
    size = job.patch_size
    rgb, _ = _render(job.label, cols * size, rows * size, False, job.hospital, job.seed, full_tissue=True)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for k in range(job.n_patches):
            y, x = (k // cols) * size, (k % cols) * size
            _vips(np.ascontiguousarray(rgb[y : y + size, x : x + size])).pngsave(
                str(tmp / f"{k:03d}.png"), compression=PNG_COMPRESSION
            )
    return TaskResult(str(job.image_id), "done", count=job.n_patches)


def run_job(job: SlideJob) -> TaskResult:
    """Worker entry point (top-level so that spawned processes can unpickle it)."""
    writer = {"png": _write_png_job, "tiff": _write_tiff_job, "patches": _write_patch_job}[job.kind]
    try:
        return writer(job)
    except Exception as err:  # reported, the other slides go on
        return TaskResult(str(job.image_id), "failed", f"{job.kind} {job.out}: {type(err).__name__}: {err}")


# ------------------------------------------------------------------------------------------------ plan


def _check(cfg: Config) -> None:
    """Ranges are checked when the config loads; only the class names can differ from what is drawn."""
    if list(cfg.data.classes) != list(CLASSES):
        log.warning("data.classes %s differ from the synthetic classes %s", cfg.data.classes, CLASSES)


def build_plan(cfg: Config) -> dict[str, pd.DataFrame]:
    """Every slide to write, as tables: train, test (with hidden label/hospital), tiff and patch sources."""
    _check(cfg)
    syn = cfg.synthetic
    rng = np.random.default_rng([int(syn.seed), 20231006])
    classes = list(CLASSES)

    def size(is_tma: bool) -> tuple[int, int]:
        if is_tma:
            side = int(rng.choice(syn.tma_sides))
            return side, side
        return int(rng.integers(syn.wsi_width[0], syn.wsi_width[1] + 1)), int(
            rng.integers(syn.wsi_height[0], syn.wsi_height[1] + 1)
        )

    train: list[dict[str, Any]] = []
    for label in classes:
        n = syn.wsi_per_class + syn.tma_per_class
        hospitals = np.concatenate([rng.permutation(syn.train_hospitals) for _ in range(n // syn.train_hospitals + 1)])
        for k in range(n):
            is_tma = k >= syn.wsi_per_class
            width, height = size(is_tma)
            train.append(dict(label=label, image_width=width, image_height=height, is_tma=is_tma,
                              hospital=int(hospitals[k])))  # fmt: skip

    n_test = int(syn.test_images)
    n_tma = round(n_test * float(syn.test_tma_fraction))
    test_tma = rng.permutation([True] * n_tma + [False] * (n_test - n_tma))
    offset = int(rng.integers(len(classes)))
    test_labels = [OUTLIER] * syn.test_other + [
        classes[(offset + i) % len(classes)] for i in range(n_test - syn.test_other)
    ]
    test_labels = list(rng.permutation(test_labels)) if test_labels else []
    test = []
    for label, is_tma in zip(test_labels, test_tma, strict=True):
        width, height = size(bool(is_tma))
        test.append(dict(label=str(label), image_width=width, image_height=height, is_tma=bool(is_tma),
                         hospital=int(syn.train_hospitals)))  # fmt: skip

    tiff = []
    for k in range(syn.external_tiff_slides):
        width, height = size(False)
        tiff.append(dict(label=classes[k % len(classes)], image_width=width, image_height=height,
                         hospital=int(syn.train_hospitals) + 1))  # fmt: skip
    patches = [
        dict(label=classes[k % len(classes)], hospital=int(syn.train_hospitals) + 2)
        for k in range(syn.external_patch_slides)
    ]

    total = len(train) + len(test) + len(tiff) + len(patches)
    ids = rng.choice(np.arange(10, 10 + max(100_000, 4 * total)), size=total, replace=False)
    tables = {}
    start = 0
    for name, rows in (("train", train), ("test", test), ("tiff", tiff), ("patches", patches)):
        frame = pd.DataFrame(rows)
        frame.insert(0, "image_id", ids[start : start + len(rows)].astype(np.int64))
        start += len(rows)
        tables[name] = frame.sort_values("image_id", ignore_index=True) if name in ("train", "test") else frame
    return tables


def _jobs(cfg: Config, plan: dict[str, pd.DataFrame]) -> list[SlideJob]:
    raw, ext, syn, data = Path(cfg.paths.raw), Path(cfg.paths.external), cfg.synthetic, cfg.data
    jobs = []
    for split in ("train", "test"):
        images, thumbs = raw / data[f"{split}_images"], raw / data[f"{split}_thumbnails"]
        for row in plan[split].itertuples(index=False):
            jobs.append(SlideJob(
                kind="png", image_id=row.image_id, label=row.label, width=row.image_width,
                height=row.image_height, is_tma=bool(row.is_tma), hospital=row.hospital,
                seed=slide_seed(syn.seed, row.image_id), out=str(images / f"{row.image_id}.png"),
                thumbnail="" if row.is_tma else str(thumbs / f"{row.image_id}_thumbnail.png"),
                thumbnail_max_side=int(syn.thumbnail_max_side),
            ))  # fmt: skip
    for row in plan["tiff"].itertuples(index=False):
        jobs.append(SlideJob(
            kind="tiff", image_id=row.image_id, label=row.label, width=row.image_width, height=row.image_height,
            is_tma=False, hospital=row.hospital, seed=slide_seed(syn.seed, row.image_id),
            out=str(ext / TIFF_DIR / f"{row.image_id}.tiff"),
        ))  # fmt: skip
    tile = int(cfg.tiling.tile_size)
    for row in plan["patches"].itertuples(index=False):
        jobs.append(SlideJob(
            kind="patches", image_id=row.image_id, label=row.label, width=tile, height=tile, is_tma=False,
            hospital=row.hospital, seed=slide_seed(syn.seed, row.image_id),
            out=str(ext / PATCH_DIR / str(row.image_id)), patch_size=tile,
            n_patches=int(syn.external_patches_per_slide),
        ))  # fmt: skip
    # largest first: better load balance across workers
    return sorted(jobs, key=lambda j: -(j.width * j.height if j.kind != "patches" else tile * tile * j.n_patches))


def generate(cfg: Config) -> dict:
    """Write the synthetic raw folder, the external sources and the hidden test labels; return a summary."""
    started = time.perf_counter()
    raw, ext, data = Path(cfg.paths.raw), Path(cfg.paths.external), cfg.data
    plan = build_plan(cfg)
    folders = [raw / data[key] for key in ("train_images", "test_images", "train_thumbnails", "test_thumbnails")]
    folders += [ext / TIFF_DIR, ext / PATCH_DIR]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(folder)
    jobs = _jobs(cfg, plan)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    failures = []
    for result in run_tasks(jobs, run_job, workers=int(cfg.synthetic.workers), desc="synthetic", unit_counted="files"):
        counts[result.status] = counts.get(result.status, 0) + 1
        if result.status == "failed":
            failures.append(result.message)
            log.error("synthetic slide %s failed: %s", result.item, result.message)
    if failures:
        raise RuntimeError(f"{len(failures)} synthetic slides failed, first: {failures[0]}")

    train, test = plan["train"], plan["test"]
    atomic_write_csv(train[["image_id", "label", "image_width", "image_height", "is_tma"]], raw / data.train_csv)
    atomic_write_csv(test[["image_id", "image_width", "image_height"]], raw / data.test_csv)
    atomic_write_csv(test[["image_id"]].assign(label="HGSC"), raw / data.sample_submission_csv)
    atomic_write_csv(test[["image_id", "label", "is_tma", "hospital"]], cfg.paths.hidden_test_labels)
    tiff = plan["tiff"]
    atomic_write_csv(
        tiff.assign(file=tiff.image_id.astype(str) + ".tiff")[["image_id", "file", "label"]],
        ext / TIFF_DIR / "labels.csv",
    )
    n_patches = int(cfg.synthetic.external_patches_per_slide)
    patch_rows = [
        (row.image_id, f"{row.image_id}/{k:03d}.png", row.label)
        for row in plan["patches"].itertuples(index=False)
        for k in range(n_patches)
    ]
    atomic_write_csv(pd.DataFrame(patch_rows, columns=["image_id", "file", "label"]), ext / PATCH_DIR / "labels.csv")
    save_config(cfg, raw)

    summary = {
        "train": len(train),
        "train_tma": int(train.is_tma.sum()),
        "test": len(test),
        "test_tma": int(test.is_tma.sum()),
        "test_other": int((test.label == OUTLIER).sum()),
        "external_tiff": len(tiff),
        "external_patch_slides": len(plan["patches"]),
        "external_patches": len(patch_rows),
        "written": counts["done"],
        "skipped": counts["skipped"],
        "raw": str(raw),
        "external": str(ext),
        "hidden_test_labels": str(cfg.paths.hidden_test_labels),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "synthetic data: %d train (%d TMA), %d test (%d TMA, %d Other), %d external TIFFs, %d patch slides "
        "(%d patches); %d written, %d skipped in %.1f s -> %s",
        summary["train"], summary["train_tma"], summary["test"], summary["test_tma"], summary["test_other"],
        summary["external_tiff"], summary["external_patch_slides"], summary["external_patches"],
        summary["written"], summary["skipped"], summary["seconds"], raw,
    )  # fmt: skip
    return summary


def run(cfg: Config) -> dict:
    """Stage 00 entry point (scripts/00_make_synthetic_data.py)."""
    return generate(cfg)
