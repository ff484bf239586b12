"""Stage 00: a seeded, UBC-OCEAN-shaped raw folder (train/test CSVs, PNGs, thumbnails) plus two external
sources (pyramidal TIFFs with mpp; pre-cut patch folders) and the hidden test labels for scoring demos.

Every slide is seeded from (synthetic.seed, image_id), so the output does not depend on the worker count;
slides already on disk are skipped, and every file is written to a temporary name and then renamed.

The hard-benchmark keys (all off by default, the demo's output is unchanged) make the data look like the real
task: real class proportions, a test set from unseen hospitals with stronger stain shifts and several kinds of
"Other", overlapping morphology, partial tumour, scanner artefacts and supplemental tumour masks.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyvips

from ubc_ocean import layout
from ubc_ocean.config import Config, save_config
from ubc_ocean.io_utils import atomic_path, atomic_write_csv, clean_stale_temporaries
from ubc_ocean.parallel import TaskResult, run_tasks
from ubc_ocean.synthetic.hospital import HospitalLook, apply_scanner, hospital_look
from ubc_ocean.synthetic.morphology import (
    CLASSES,
    OTHER_NEAR_HGSC,
    OTHER_STROMA,
    OUTLIER,
    render_morphology,
    tma_core_mask,
    wsi_tissue_mask,
)
from ubc_ocean.synthetic.scanner import Artefacts, apply_artefacts
from ubc_ocean.synthetic.stain import hospital_stain

log = logging.getLogger(__name__)

TIFF_MPP = 0.5  # microns per pixel at 20x
TIFF_DIR = "synthetic_tiff"
PATCH_DIR = "synthetic_patches"
PNG_COMPRESSION = 2  # zlib level: fast, files a little larger
# synthetic.test_other_kinds -> (pattern drawn, hidden labels' kind)
OTHER_KINDS = {
    "fibrous": (OUTLIER, "other_fibrous"),
    "stroma": (OTHER_STROMA, "other_stroma"),
    "near_hgsc": (OTHER_NEAR_HGSC, "other_near_hgsc"),
}
TUMOUR_KIND = "tumour"
PLAN_COLUMNS = {
    "train": ["label", "image_width", "image_height", "is_tma", "hospital"],
    "test": ["label", "image_width", "image_height", "is_tma", "hospital", "kind", "pattern"],
    "tiff": ["label", "image_width", "image_height", "hospital"],
    "patches": ["label", "hospital"],
}
MASK_TUMOUR, MASK_STROMA = (255, 0, 0), (0, 255, 0)  # supplemental mask colours (black: unannotated)


def slide_seed(seed: int, image_id: int) -> int:
    """The per-slide seed derived from the global seed and the image id."""
    return int(np.random.SeedSequence([int(seed), int(image_id)]).generate_state(1)[0])


@dataclass(frozen=True)
class SlideLook:
    """The hard-benchmark settings of one slide (defaults: the demo's look)."""

    tumour_share: float | None = None  # share of the tissue that is tumour; None: the pattern's own
    overlap: float = 0.0  # synthetic.morphology_overlap
    stain_shift: float = 0.0  # extra hospital stain shift (test hospitals)
    artefacts: Artefacts = field(default_factory=Artefacts)
    hospital: HospitalLook = field(default_factory=HospitalLook)  # a test hospital's scanner, sections, patients


def _render(
    label: str, width: int, height: int, is_tma: bool, hospital: int, seed: int, full_tissue: bool = False,
    look: SlideLook = SlideLook(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb, tissue mask, tumour mask); the spawned streams 0-2 are the demo's, 3 draws the artefacts."""
    streams = np.random.SeedSequence(seed).spawn(4)
    mask_rng, tissue_rng, stain_rng, artefact_rng = (np.random.default_rng(s) for s in streams)
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
    tumour = np.zeros((height, width), bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return rgb, mask, tumour
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    inner = mask[box]
    maps = render_morphology(label, inner.shape, 2.0 if is_tma else 1.0, tissue_rng, tissue=inner,
                             tumour_share=look.tumour_share, overlap=look.overlap,
                             nuclei_drift=look.hospital.nuclei)  # fmt: skip
    if look.hospital.thickness != 1.0:  # Beer-Lambert: optical density grows with the section's thickness
        for stain in (maps.hema, maps.eosin, maps.mucin):
            stain *= np.float32(look.hospital.thickness)
    tissue = hospital_stain(hospital, look.stain_shift).jittered(stain_rng).to_rgb(maps)
    if is_tma:
        np.minimum(tissue, 254, out=tissue)  # tissue is never pure white, background always is
    np.copyto(rgb[box], tissue, where=inner[..., None])
    tumour[box] = maps.tumour & inner
    apply_scanner(rgb, mask, look.hospital)  # each a no-op when its look is off
    apply_artefacts(rgb, mask, look.artefacts, artefact_rng)
    if is_tma and (look.hospital.optics or look.artefacts.any):
        np.minimum(rgb, 254, out=rgb, where=mask[..., None])
    return rgb, mask, tumour


def render_slide(
    label: str, width: int, height: int, is_tma: bool, hospital: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render one slide: (rgb uint8 [H, W, 3], tissue mask bool [H, W]).

    WSIs (20x) have black (0, 0, 0) background, TMAs (40x, all length scales doubled, square) white.
    """
    rgb, mask, _ = _render(label, width, height, is_tma, hospital, seed)
    return rgb, mask


def render_slide_layers(
    label: str, width: int, height: int, is_tma: bool, hospital: int, seed: int, look: SlideLook = SlideLook()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`render_slide` with a hard-benchmark ``look``, plus the tumour mask: (rgb, tissue, tumour)."""
    return _render(label, width, height, is_tma, hospital, seed, look=look)


def supplemental_mask(tissue: np.ndarray, tumour: np.ndarray) -> np.ndarray:
    """The competition's mask colours: red tumour, green stroma (tissue that is not tumour), black elsewhere."""
    out = np.zeros((*tissue.shape, 3), np.uint8)
    out[tissue & ~tumour] = MASK_STROMA
    out[tumour] = MASK_TUMOUR
    return out


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
    look: SlideLook = SlideLook()
    mask_out: str = ""  # supplemental tumour mask PNG ("" : none)


def _vips(rgb: np.ndarray) -> pyvips.Image:
    return pyvips.Image.new_from_array(rgb, interpretation="srgb")


def _save_thumbnail(source: pyvips.Image, path: str, max_side: int) -> None:
    thumb = source.thumbnail_image(max_side, height=max_side, size="both")
    with atomic_path(path) as tmp:
        thumb.pngsave(str(tmp), compression=PNG_COMPRESSION)


def _write_png_job(job: SlideJob) -> TaskResult:
    out = Path(job.out)
    thumb_missing = bool(job.thumbnail) and not Path(job.thumbnail).exists()
    mask_missing = bool(job.mask_out) and not Path(job.mask_out).exists()
    if out.exists() and not mask_missing:
        if thumb_missing:
            _save_thumbnail(pyvips.Image.new_from_file(str(out)), job.thumbnail, job.thumbnail_max_side)
            return TaskResult(str(job.image_id), "done", "thumbnail only")
        return TaskResult(str(job.image_id), "skipped")
    rgb, tissue, tumour = render_slide_layers(
        job.label, job.width, job.height, job.is_tma, job.hospital, job.seed, job.look
    )
    if job.mask_out:
        with atomic_path(job.mask_out) as tmp:
            _vips(supplemental_mask(tissue, tumour)).pngsave(str(tmp), compression=PNG_COMPRESSION)
    image = _vips(rgb)
    if out.exists():
        if thumb_missing:
            _save_thumbnail(image, job.thumbnail, job.thumbnail_max_side)
        return TaskResult(str(job.image_id), "done", "mask only")
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
    rgb, _, _ = _render(job.label, cols * size, rows * size, False, job.hospital, job.seed, full_tissue=True)
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


def allocate(total: int, weights: list[float], minimum: int = 0) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders), each share at least ``minimum``
    while the total allows it."""
    counts = [minimum] * len(weights) if total >= minimum * len(weights) else [0] * len(weights)
    left = total - sum(counts)
    share = np.asarray(weights, float) / max(float(np.sum(weights)), 1e-12) * left
    floor = np.floor(share).astype(int)
    order = np.argsort(-(share - floor), kind="stable")
    floor[order[: left - int(floor.sum())]] += 1
    return [int(c + f) for c, f in zip(counts, floor, strict=True)]


def _train_counts(syn: Any, classes: list[str]) -> list[tuple[int, int]]:
    """(WSIs, TMAs) per class: the per-class keys, or synthetic.train_images split by class_proportions."""
    if int(syn.train_images) == 0:
        return [(int(syn.wsi_per_class), int(syn.tma_per_class))] * len(classes)
    weights = [float(syn.class_proportions[c]) for c in classes]
    totals = allocate(int(syn.train_images), weights, minimum=1)
    tmas = allocate(round(int(syn.train_images) * float(syn.train_tma_fraction)), weights)
    return [(n - min(t, n), min(t, n)) for n, t in zip(totals, tmas, strict=True)]


def _test_tumour_labels(syn: Any, classes: list[str], count: int, offset: int) -> list[str]:
    """Test labels of the tumour images: classes in turn, or (proportional) every class then the real mix."""
    if syn.test_class_mix == "even":
        return [classes[(offset + i) % len(classes)] for i in range(count)]
    weights = [float(syn.class_proportions[c]) for c in classes]
    return [c for c, n in zip(classes, allocate(count, weights, minimum=1), strict=True) for _ in range(n)]


def test_hospital_ids(syn: Any) -> list[int]:
    """Unseen test hospitals: index train_hospitals (the demo's), then ids after the two external sources'."""
    first = int(syn.train_hospitals)
    return [first] + [first + 2 + k for k in range(1, int(syn.test_hospitals))]


def _add_looks(syn: Any, tables: dict[str, pd.DataFrame]) -> None:
    """Per-slide hard-benchmark draws (own stream, so the demo's plan is untouched): tumour share, artefacts,
    stain shift (test) and which training WSIs get a supplemental mask."""
    rng = np.random.default_rng([int(syn.seed), 20231006, 1])
    for name in ("train", "test"):
        frame = tables[name]
        n = len(frame)
        share = np.full(n, np.nan)
        if syn.tumour_share is not None:
            low, high = syn.tumour_share
            share = np.where(frame.is_tma, np.nan, rng.uniform(low, high, n))
        frame["tumour_share"] = share
        blur = rng.random(n) < float(syn.blur_probability)
        frame["blur_sigma"] = np.where(blur, rng.uniform(*syn.blur_sigma, n), 0.0)
        jpeg = rng.random(n) < float(syn.jpeg_probability)
        frame["jpeg_quality"] = np.where(jpeg, rng.integers(syn.jpeg_quality[0], syn.jpeg_quality[1] + 1, n), 0)
        pen = rng.random(n) < float(syn.pen_probability)
        frame["pen_strokes"] = np.where(pen, rng.integers(1, 4, n), 0)
        frame["stain_shift"] = float(syn.test_stain_shift) if name == "test" else 0.0
        frame["unseen_hospital"] = name == "test"
    train = tables["train"]
    wsis = np.flatnonzero(~train.is_tma.to_numpy(bool))
    chosen = rng.choice(wsis, size=round(float(syn.mask_fraction) * wsis.size), replace=False)
    train["has_mask"] = np.isin(np.arange(len(train)), chosen)


def slide_look(row: Any, syn: Any) -> SlideLook:
    """The :class:`SlideLook` of a plan row (train or test)."""
    share = float(row.tumour_share)
    return SlideLook(
        tumour_share=None if np.isnan(share) else share,
        overlap=float(syn.morphology_overlap),
        stain_shift=float(row.stain_shift),
        artefacts=Artefacts(float(row.blur_sigma), int(row.jpeg_quality), int(row.pen_strokes)),
        hospital=hospital_look(syn, int(row.hospital)) if bool(row.unseen_hospital) else HospitalLook(),
    )


def build_plan(cfg: Config) -> dict[str, pd.DataFrame]:
    """Every slide to write, as tables: train (with has_mask), test (with hidden label, hospital and kind),
    tiff and patch sources; train and test also carry each slide's look (tumour share, artefacts)."""
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
    for label, (n_wsi, n_tma) in zip(classes, _train_counts(syn, classes), strict=True):
        n = n_wsi + n_tma
        hospitals = np.concatenate([rng.permutation(syn.train_hospitals) for _ in range(n // syn.train_hospitals + 1)])
        for k in range(n):
            is_tma = k >= n_wsi
            width, height = size(is_tma)
            train.append(dict(label=label, image_width=width, image_height=height, is_tma=is_tma,
                              hospital=int(hospitals[k])))  # fmt: skip

    n_test = int(syn.test_images)
    n_tma = round(n_test * float(syn.test_tma_fraction))
    test_tma = rng.permutation([True] * n_tma + [False] * (n_test - n_tma))
    offset = int(rng.integers(len(classes)))
    test_labels = [OUTLIER] * syn.test_other + _test_tumour_labels(syn, classes, n_test - syn.test_other, offset)
    test_labels = list(rng.permutation(test_labels)) if test_labels else []
    hospitals, kinds = test_hospital_ids(syn), list(syn.test_other_kinds)
    test = []
    n_other = 0
    for k, (label, is_tma) in enumerate(zip(test_labels, test_tma, strict=True)):
        width, height = size(bool(is_tma))
        pattern, kind = str(label), TUMOUR_KIND
        if label == OUTLIER:
            pattern, kind = OTHER_KINDS[kinds[n_other % len(kinds)]]
            n_other += 1
        test.append(dict(label=str(label), image_width=width, image_height=height, is_tma=bool(is_tma),
                         hospital=hospitals[k % len(hospitals)], kind=kind, pattern=pattern))  # fmt: skip

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
        frame = pd.DataFrame(rows, columns=PLAN_COLUMNS.get(name))
        frame.insert(0, "image_id", ids[start : start + len(rows)].astype(np.int64))
        start += len(rows)
        tables[name] = frame.sort_values("image_id", ignore_index=True) if name in ("train", "test") else frame
    _add_looks(syn, tables)
    return tables


def _jobs(cfg: Config, plan: dict[str, pd.DataFrame]) -> list[SlideJob]:
    raw, ext, syn, data = Path(cfg.paths.raw), Path(cfg.paths.external), cfg.synthetic, cfg.data
    jobs = []
    for split in ("train", "test"):
        images, thumbs = raw / data[f"{split}_images"], raw / data[f"{split}_thumbnails"]
        for row in plan[split].itertuples(index=False):
            has_mask = bool(getattr(row, "has_mask", False))
            jobs.append(SlideJob(
                kind="png", image_id=row.image_id, label=getattr(row, "pattern", row.label),
                width=row.image_width, height=row.image_height, is_tma=bool(row.is_tma), hospital=row.hospital,
                seed=slide_seed(syn.seed, row.image_id), out=str(images / f"{row.image_id}.png"),
                thumbnail="" if row.is_tma else str(thumbs / f"{row.image_id}_thumbnail.png"),
                thumbnail_max_side=int(syn.thumbnail_max_side), look=slide_look(row, syn),
                mask_out=str(layout.supplemental_mask_path(cfg, row.image_id)) if has_mask else "",
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
    if plan["train"].has_mask.any():
        folders.append(raw / data.supplemental_masks)
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
    train_columns = ["image_id", "label", "image_width", "image_height", "is_tma"]
    if cfg.synthetic.train_hospital_column:  # the real train.csv names no hospital; the benchmark may
        train_columns.append("hospital")
    atomic_write_csv(train[train_columns], raw / data.train_csv)
    atomic_write_csv(test[["image_id", "image_width", "image_height"]], raw / data.test_csv)
    atomic_write_csv(test[["image_id"]].assign(label="HGSC"), raw / data.sample_submission_csv)
    hidden = ["image_id", "label", "is_tma", "hospital"]
    if list(cfg.synthetic.test_other_kinds) != ["fibrous"]:
        hidden.append("kind")  # several kinds of Other: say which (the demo's file keeps its four columns)
    atomic_write_csv(test[hidden], cfg.paths.hidden_test_labels)
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
        "test_hospitals": sorted(int(h) for h in test.hospital.unique()),
        "supplemental_masks": int(train.has_mask.sum()),
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
