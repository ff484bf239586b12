"""Pictures of a trained run, read through ``ubc_ocean.layout``: attention heatmaps of chosen slides
(``scripts/heatmaps.py``) and one self-contained HTML report (``scripts/report.py``). CPU only; nothing is
tiled or embedded again: the heatmaps use the cached tile coordinates and the slide's thumbnail."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ubc_ocean import embedding_cache, layout
from ubc_ocean.folds import is_synthetic
from ubc_ocean.metrics import seed_mean
from ubc_ocean.outliers import OutlierThreshold
from ubc_ocean.viz.cv import cv_figure, model_summary
from ubc_ocean.viz.html import Section, figure_png, write_report
from ubc_ocean.viz.neighbours import mean_embedding
from ubc_ocean.viz.slide import SlideFiles, explain, load_slide, slide_figure

log = logging.getLogger(__name__)
WORST_SLIDES = 3


def slide_heatmap(cfg: Mapping, slide: str, n_tiles: int = 3):  # type: ignore[no-untyped-def]
    """The heatmap figure of one slide (id ``source/image_id`` or a bare competition image id) for every
    model of the run (``layout.chosen_models``): a training slide with the checkpoints of its own
    validation fold (they never saw it), a test slide with every checkpoint."""
    return _heatmap_of(cfg, layout.find_slide(cfg, slide), n_tiles)


def _heatmap_of(cfg: Mapping, files: SlideFiles, n_tiles: int = 3):  # type: ignore[no-untyped-def]
    data = load_slide(files)
    checkpoints = {name: layout.oof_checkpoints(layout.model_dir(cfg, name), files.fold)
                   for name in layout.chosen_models(cfg)}
    return slide_figure(data, explain(data, checkpoints), list(cfg["data"]["classes"]), n_tiles)


def _slide_list(slides: str | Sequence[str] | None) -> list[str]:
    items = slides.split(",") if isinstance(slides, str) else list(slides or [])
    return [s.strip() for s in items if s and s.strip()]


def heatmaps(cfg: Mapping, slides: str | Sequence[str] | None = None) -> list[Path]:
    """Write ``{run}/heatmaps/{source}_{image_id}.png`` for each of ``slides`` (a list, or ids joined by
    commas); returns the paths."""
    wanted = _slide_list(slides)
    if not wanted:
        raise ValueError("no slide given: pass --slides id1,id2 (image ids, or source/image_id)")
    layout.required_models(cfg)
    written = []
    for slide in tqdm(wanted, desc="heatmaps", unit="slide", dynamic_ncols=True):
        files = layout.find_slide(cfg, slide)
        fig = _heatmap_of(cfg, files)
        path = layout.heatmap_path(cfg, files.slide_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(figure_png(fig, dpi=100))
        log.info("%s -> %s", slide, path)
        written.append(path)
    return written


def oof_table(cfg: Mapping, name: str) -> pd.DataFrame:
    """A model's OOF predictions averaged over seeds: one row per slide."""
    return seed_mean(layout.model_dir(cfg, name).read_oof(), list(cfg["data"]["classes"]))


def worst_oof_slides(cfg: Mapping, models: Sequence[str], n: int) -> pd.DataFrame:
    """The ``n`` slides whose true class the models (averaged) gave the least probability."""
    classes = list(cfg["data"]["classes"])
    frames = [oof_table(cfg, name) for name in models]
    truth = []
    for frame in frames:
        column = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
        truth.append(frame.assign(p_true=frame[classes].to_numpy()[np.arange(len(frame)), column]))
    pooled = pd.concat(truth).groupby(["slide_id", "label"], as_index=False)["p_true"].mean()
    return pooled.nsmallest(n, "p_true").reset_index(drop=True)


def training_bag_means(cfg: Mapping) -> pd.DataFrame:
    """Every training slide's mean tile embedding (rows: slide ids; for nearest-bag look-ups). Synthetic
    TMA cores are left out: a slide's own core would be its nearest neighbour."""
    table = layout.read_training_table(cfg)
    table = table[~is_synthetic(table)]
    paths = layout.embedding_paths(layout.embeddings_root(cfg), table)
    means = {slide: mean_embedding(embedding_cache.read_embeddings(path)[0])
             for slide, path in tqdm(paths.items(), desc="bag means", unit="slide") if path.is_file()}
    return pd.DataFrame.from_dict(means, orient="index")


def _test_scores(model: layout.ModelDir, score: str) -> np.ndarray | None:
    try:
        return model.read_test_predictions()[f"score_{score}"].to_numpy()
    except (FileNotFoundError, KeyError):
        return None


def report_sections(cfg: Mapping, worst: int = WORST_SLIDES) -> list[Section]:
    """Every section of the report: the models' summary, each model's cross-validation figure, and the
    heatmaps of the worst OOF slides."""
    classes = list(cfg["data"]["classes"])
    models = layout.required_models(cfg)
    loco_path = layout.loco_scores_path(cfg)
    loco = pd.read_csv(loco_path) if loco_path.is_file() else None
    rows, figures = {}, []
    for name in tqdm(models, desc="report: models", unit="model", dynamic_ncols=True):
        model = layout.model_dir(cfg, name)
        per_slide = oof_table(cfg, name)
        threshold = OutlierThreshold.load(model.outlier)
        rows[name] = {**model_summary(per_slide, classes), "outlier score": threshold.score,
                      "threshold": threshold.threshold,  # pooled; per-type ones (if any) beside it
                      **{f"threshold {kind.upper()}": value for kind, value in threshold.per_type.items()}}
        model_loco = loco[loco["model"] == name] if loco is not None else None
        fig = cv_figure(name, per_slide, classes, threshold.score, threshold.threshold, model_loco,
                        _test_scores(model, threshold.score))
        figures.append((f"{name} cross-validation", figure_png(fig)))
    notes = [f"Run {layout.run_dir(cfg)}: {len(models)} models. Balanced accuracy of the OOF predictions "
             "(seed-averaged), with a 95% bootstrap interval over slides."]
    if loco is None:
        notes.append("No leave-one-class-out run (scripts/eval_leave_one_class_out.py): no ROC curves.")
    sections = [Section("Models", notes, [pd.DataFrame(rows).T]), Section("Cross-validation", images=figures)]
    bad = worst_oof_slides(cfg, models, worst)
    pictures = [(f"heatmap {row.slide_id}", figure_png(slide_heatmap(cfg, row.slide_id)))
                for row in tqdm(bad.itertuples(), total=len(bad), desc="report: heatmaps", unit="slide")]
    sections.append(Section("Worst OOF slides", ["The slides whose true class the models gave the least "
                                                 "probability, with each model's tile relevance."], [bad], pictures))
    return sections


def run(cfg: Mapping, worst: int = WORST_SLIDES) -> Path:
    """Write the run's HTML report (``layout.report_path``); returns its path."""
    path = write_report(layout.report_path(cfg), f"UBC-OCEAN run {cfg['experiment']}",
                        report_sections(cfg, int(worst)))
    log.info("report -> %s", path)
    return path
