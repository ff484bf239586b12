"""Stage 02: one manifest of every training slide (competition + external) with provenance, and folds.

Reads the tile store written by stage 01 and the external sources' label files; writes
``{paths.processed}/manifest.csv`` and ``{paths.processed}/folds.csv``. The folds are grouped by
``folds.group_by``: a column of ``train.csv`` (hospital, patient), or ``stain_cluster``: clusters of the
competition slides' stain vectors (:mod:`ubc_ocean.stain_vectors`, from a sample of each slide's tiles; also
written to ``{paths.processed}/stain_vectors.csv``), so that each validation fold plays an unseen hospital.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ubc_ocean import layout, tile_store
from ubc_ocean.config import save_config
from ubc_ocean.config.schema import STAIN_CLUSTER
from ubc_ocean.folds import PARENT, TRAIN_ONLY, assign_folds, is_synthetic, parent_folds, small_classes
from ubc_ocean.io_utils import FailureLog, MissingInput, atomic_write_csv
from ubc_ocean.sources import TRAIN, external_sources, read_train_csv
from ubc_ocean.stain_vectors import cluster_stain_vectors, slide_stain_vectors

log = logging.getLogger(__name__)
STAGE = "02_merge_external"
MANIFEST_COLUMNS = [
    "slide_id", "source", "image_id", "label", "is_tma", "group", "n_tiles", "provenance", "tiling_key", PARENT,
]
FOLD_COLUMNS = ["slide_id", "image_id", "source", "label", "is_tma", "fold", PARENT]
# Optional columns of train.csv and the external label files, kept in the manifest when any of them has one
# (empty for the others): stage 04 may batch slides by them (mil.harmonise_by). The real train.csv has none.
CARRIED_COLUMNS = ["hospital"]


def _groups(frame: pd.DataFrame, column: str | None, prefix: str) -> list[str]:
    """The grouping value per row (the ``folds.group_by`` column when the table has it, else the image)."""
    values = frame[column] if column and column in frame.columns else frame["image_id"]
    return [f"{prefix}{value}" for value in values.astype(str)]


def _group_column(cfg: Mapping) -> str | None:
    """The label table column that groups the slides: ``folds.group_by`` unless null or ``stain_cluster``."""
    group_by = cfg["folds"]["group_by"]
    return None if group_by in (None, STAIN_CLUSTER) else str(group_by)


def _candidate_rows(cfg: Mapping) -> list[dict]:
    group_column = _group_column(cfg)
    train = read_train_csv(cfg)
    if group_column and group_column not in train.columns:
        raise ValueError(f"folds.group_by '{group_column}' is not a column of train.csv (columns: "
                         f"{', '.join(map(str, train.columns))}; or {STAIN_CLUSTER})")
    rows = [
        {"source": TRAIN, "image_id": str(r.image_id), "label": r.label, "is_tma": bool(r.is_tma),
         "group": group, "provenance": "competition", **carried}
        for r, group, carried in zip(train.itertuples(index=False), _groups(train, group_column, ""),
                                     _carried(train), strict=True)
    ]
    for source in external_sources(cfg):
        labels = source.labels().drop_duplicates("image_id")
        groups = _groups(labels, group_column, f"{source.name}:")
        rows += [
            {"source": source.name, "image_id": str(r.image_id), "label": str(r.label), "is_tma": False,
             "group": group, "provenance": f"external:{source.name}", **carried}
            for r, group, carried in zip(labels.itertuples(index=False), groups, _carried(labels), strict=True)
        ]
    return rows


def _carried(frame: pd.DataFrame) -> list[dict]:
    """Per row, the values of the :data:`CARRIED_COLUMNS` that ``frame`` has (as text; empty stays empty)."""
    present = [c for c in CARRIED_COLUMNS if c in frame.columns]
    if not present:  # pandas < 3 iterates no rows at all over a frame without columns
        return [{} for _ in range(len(frame))]
    return [{c: "" if pd.isna(v) else str(v) for c, v in zip(present, values, strict=True)}
            for values in frame[present].itertuples(index=False)]


def _core_rows(cfg: Mapping, parent: Mapping, info: Mapping, failures: FailureLog | None) -> list[dict]:
    """The synthetic TMA cores stage 01 cut from a slide (its ``slide.json`` lists them): bags with the
    parent's label and group, ``is_tma`` true, ``parent_image_id``, provenance ``{parent's}:synthetic_core``."""
    rows = []
    for core in info.get(tile_store.CORES_KEY, []):
        image_id = str(core["image_id"])
        slide_id = f"{parent['source']}/{image_id}"
        folder = layout.slide_tiles_dir(cfg, parent["source"], image_id)
        if not tile_store.is_complete(folder):
            problem = f"synthetic core listed by {parent['source']}/{parent['image_id']} has no tiles in {folder}"
            log.warning("%s: left out: %s", slide_id, problem)
            if failures is not None:
                failures.record(slide_id, problem)
            continue
        rows.append({**parent, "slide_id": slide_id, "image_id": image_id, "is_tma": True,
                     "provenance": f"{parent['provenance']}:synthetic_core",
                     "n_tiles": int(tile_store.read_slide_info(folder)["n_tiles"]),
                     "tiling_key": layout.tiling_key(cfg),
                     PARENT: str(parent["image_id"])})
    return rows


def build_manifest(cfg: Mapping, failures: FailureLog | None = None) -> pd.DataFrame:
    """Keep the slides that stage 01 tiled and whose label is a known class; record the others."""
    classes = set(cfg["data"]["classes"])
    key = layout.tiling_key(cfg)
    kept = []
    for row in _candidate_rows(cfg):
        slide_id = f"{row['source']}/{row['image_id']}"
        folder = layout.slide_tiles_dir(cfg, row["source"], row["image_id"])
        problem = None
        if row["label"] not in classes:
            problem = f"label {row['label']!r} is not one of {sorted(classes)}"
        elif not tile_store.is_complete(folder):
            problem = f"no tiles in {folder} (stage 01 failed or was not run for it)"
        if problem:
            log.warning("%s: left out: %s", slide_id, problem)
            if failures is not None:
                failures.record(slide_id, problem)
            continue
        info = tile_store.read_slide_info(folder)
        kept.append({**row, "slide_id": slide_id, "n_tiles": int(info["n_tiles"]),
                     "is_tma": bool(info.get("is_tma", row["is_tma"])), "tiling_key": key})
        kept += _core_rows(cfg, row, info, failures)
    carried = [c for c in CARRIED_COLUMNS if any(c in row for row in kept)]
    manifest = pd.DataFrame(kept, columns=MANIFEST_COLUMNS + carried)
    duplicated = manifest["slide_id"].duplicated()
    if duplicated.any():
        raise ValueError(f"duplicate slides in manifest: {manifest.loc[duplicated, 'slide_id'].tolist()[:5]}")
    return manifest


def stain_clusters(cfg: Mapping, manifest: pd.DataFrame, validating: pd.Series) -> pd.Series:
    """Each ``validating`` slide's stain cluster (``stain_cluster:{k}``; a synthetic core of such a slide takes
    its parent's; other rows empty); writes every validating slide's stain vector and cluster to
    ``stain_vectors.csv``. ``folds.stain_clusters`` clusters (0: ``folds.n_splits``), seeded by ``seed``."""
    slides = manifest[validating]
    folders = {row.slide_id: layout.slide_tiles_dir(cfg, row.source, row.image_id) for row in slides.itertuples()}
    vectors = slide_stain_vectors(folders)
    folds_cfg = cfg["folds"]
    n_clusters = int(folds_cfg["stain_clusters"]) or int(folds_cfg["n_splits"])
    vectors["cluster"] = cluster_stain_vectors(vectors, n_clusters, int(cfg["seed"]))
    atomic_write_csv(vectors, layout.stain_vectors_path(cfg))
    log.info("stage 02: %d slides in %d stain clusters (sizes %s) -> %s", len(vectors), vectors["cluster"].nunique(),
             vectors["cluster"].value_counts().sort_index().tolist(), layout.stain_vectors_path(cfg))
    cluster = dict(zip(vectors["slide_id"], f"{STAIN_CLUSTER}:" + vectors["cluster"].astype(str), strict=True))
    clusters = pd.Series(pd.NA, index=manifest.index, dtype=object)
    clusters[validating] = slides["slide_id"].map(cluster)
    parents = manifest["source"].astype(str) + "/" + manifest[PARENT].astype(str)
    cores = is_synthetic(manifest) & parents.isin(set(cluster))
    clusters[cores] = parents[cores].map(cluster)
    return clusters


def needs_stain_clusters(cfg: Mapping) -> bool:
    """Whether stage 02 clusters the slides' stain vectors: folds grouped by them, or ComBat batching by them
    (``mil.harmonise_by: stain_cluster``, the manifest column it then reads)."""
    mil = cfg["mil"]
    return cfg["folds"]["group_by"] == STAIN_CLUSTER or (
        mil["harmonise"] != "none" and mil["harmonise_by"] == STAIN_CLUSTER)


def run(cfg: Mapping) -> pd.DataFrame:
    """Write manifest.csv and folds.csv (external slides get fold -1: train-only), and stain_vectors.csv (with
    a ``stain_cluster`` manifest column) with ``folds.group_by=stain_cluster`` or ComBat batching by it."""
    layout.require_writable(cfg, "processed")
    tiles = layout.tiles_root(cfg)
    if not tiles.is_dir():
        raise MissingInput(tiles, layout.run_stage_first("01"))
    out = Path(cfg["paths"]["processed"])
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, "config_02.yaml")
    failures = FailureLog(out / "failures_02.csv", STAGE)
    failures.path.unlink(missing_ok=True)
    manifest = build_manifest(cfg, failures)
    if manifest.empty:
        raise RuntimeError("manifest is empty: no tiled slide with a known label (run stage 01 first)")
    is_competition = manifest["provenance"].eq("competition") & ~is_synthetic(manifest)  # the slides that validate
    folds_cfg = cfg["folds"]
    for label, count in small_classes(manifest, int(folds_cfg["n_splits"]), is_competition).items():
        message = (f"class {label} has {count} validating slides for {folds_cfg['n_splits']} folds: "
                   f"some folds cannot validate it (lower folds.n_splits or add slides)")
        log.warning(message)
        failures.record(f"class:{label}", message)
    if needs_stain_clusters(cfg):
        manifest[STAIN_CLUSTER] = stain_clusters(cfg, manifest, is_competition)
        if folds_cfg["group_by"] == STAIN_CLUSTER:
            manifest["group"] = manifest[STAIN_CLUSTER].where(manifest[STAIN_CLUSTER].notna(), manifest["group"])
    manifest["fold"] = parent_folds(manifest, assign_folds(
        manifest, int(folds_cfg["n_splits"]), int(cfg["seed"]),
        group_column="group" if folds_cfg["group_by"] else None, validate_mask=is_competition,
    ))
    atomic_write_csv(manifest.drop(columns="fold"), layout.manifest_path(cfg))
    atomic_write_csv(manifest[FOLD_COLUMNS], layout.folds_path(cfg))
    summary = manifest.groupby(["provenance", "label"]).size().unstack(fill_value=0)
    log.info("stage 02: %d slides (%d train-only, %d synthetic TMA cores in their parent's fold) -> %s\n%s",
             len(manifest), int((manifest["fold"] == TRAIN_ONLY).sum()), int(is_synthetic(manifest).sum()),
             layout.manifest_path(cfg), summary.to_string())
    return manifest
