"""Choosing ``tiling.min_blur_score`` from your own slides.

Focus scores depend on stain, scanner and tissue, so no one threshold fits every dataset. This module
scores the tissue tiles of a sample of training slides as scanned and after a known Gaussian defocus
(sigma in pixels at the target magnification), and tabulates which fraction of each a threshold keeps:
pick one that keeps nearly all scanned tiles and drops the defocus you consider unusable.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ubc_ocean import layout
from ubc_ocean.config.tiling import TilingSettings
from ubc_ocean.slides import SlideError
from ubc_ocean.sources import TRAIN, SlideSpec, competition_specs
from ubc_ocean.tiling.quality import focus_score
from ubc_ocean.tiling.tiler import SlideTiler

log = logging.getLogger(__name__)


def defocus_scores(rgb: np.ndarray, metric: str, sigmas: Sequence[float]) -> list[float]:
    """The tile's focus score as scanned (sigma 0), then after a Gaussian blur of each ``sigma``."""
    scores = [focus_score(rgb, metric)]
    scores += [focus_score(cv2.GaussianBlur(rgb, (0, 0), float(sigma)), metric) for sigma in sigmas]
    return scores


def slide_focus_scores(spec: SlideSpec, cfg: Mapping, sigmas: Sequence[float]) -> pd.DataFrame:
    """One row per tissue tile of the slide (tiled as stage 01 would, without the quality filters) and
    one column per sigma (0 = as scanned)."""
    settings = TilingSettings.from_config(cfg)
    unfiltered = dataclasses.replace(settings, min_blur_score=0.0, max_artefact_fraction=1.0)
    with SlideTiler(spec, unfiltered) as tiler:
        records, rows = [], []
        for record, rgb in tiler:
            records.append(record)
            rows.append(defocus_scores(rgb, settings.blur_metric, sigmas))
        kept = {record.box for record in tiler.finish(records)}
    frame = pd.DataFrame([row for row, record in zip(rows, records, strict=True) if record.box in kept],
                         columns=[0.0, *map(float, sigmas)])
    frame.insert(0, "slide", spec.slide_id)
    return frame


def kept_fractions(scores: pd.DataFrame, thresholds: Iterable[float]) -> pd.DataFrame:
    """Fraction of tiles whose score reaches each threshold (columns), per defocus sigma (rows)."""
    values = scores.drop(columns="slide")
    table = pd.DataFrame({float(t): (values >= t).mean(axis=0) for t in thresholds})
    table.index.name = "sigma"
    return table


def run(cfg: Mapping) -> pd.DataFrame:
    """Score a seeded sample of ``focus_calibration.slides`` training slides; print and save the tables."""
    settings = cfg["focus_calibration"]
    sigmas = [float(s) for s in settings["defocus_sigmas"]]
    specs = competition_specs(cfg, TRAIN)
    rng = np.random.default_rng(int(cfg["seed"]))
    chosen = sorted(rng.choice(len(specs), size=min(int(settings["slides"]), len(specs)), replace=False))
    frames = []
    for index in tqdm(chosen, desc="focus calibration", unit="slide"):
        try:
            frames.append(slide_focus_scores(specs[index], cfg, sigmas))
        except (SlideError, OSError, ValueError) as err:
            log.warning("%s skipped: %s", specs[index].slide_id, err)
    if not frames:
        raise RuntimeError("no slide could be scored: check paths.raw and stage 01's failures")
    scores = pd.concat(frames, ignore_index=True)
    table = kept_fractions(scores, settings["thresholds"])
    metric = str(cfg["tiling"]["blur_metric"])
    out = layout.tiles_root(cfg).parent / f"focus_calibration_{metric}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out, index=False)
    quantiles = scores.drop(columns="slide").quantile([0.01, 0.05, 0.5]).T
    quantiles.index.name = "sigma"
    log.info("%s scores of %d tiles from %d slides (sigma 0 = as scanned), quantiles:\n%s\n"
             "fraction of tiles kept by min_blur_score (columns):\n%s\nper-tile scores -> %s",
             metric, len(scores), len(frames), quantiles.round(1).to_string(), table.round(3).to_string(), out)
    return table
