"""Stage 04: cross-validated training of every configured MIL model, OOF predictions and calibration.

Run folder ``{paths.runs}/{experiment}/``::

    config.yaml, failures_04.csv
    stain_reference.json         features.stain_normalisation on: stage 03's stain reference, which stage 05
                                 normalises the test tiles to (its sha256 is in each model's complete.json)
    {model}/fold{k}_seed{s}.pt   checkpoints (weights + model config + classes)
    {model}/oof.csv              image_id, slide_id, fold, seed, label, is_tma, one column per class
    {model}/metrics.json         balanced accuracy (all, WSI, TMA), per-class recall, the outlier threshold
                                 and the share of OOF slides it flags (all, WSI, TMA) (+ tumour_scorer: its
                                 held-out tile AUC per fold, when tumour.scorer is on)
    {model}/tumour_scorer.json   tumour.scorer on: the scorer trained on every masked slide and the tile choice
                                 (stage 05 cuts the test bags down with it)
    {model}/source_statistics.npz  mil.feature_alignment coral: the moments of every training tile (all the
                                 bags loaded, by kind of image); stage 05 maps the test tiles onto them (CORAL)
    {model}/confusion.csv|png, curves.csv, outlier.json (threshold calibrated on OOF, pooled or per type)
    {model}/harmonisation.csv    mil.harmonise on: per fold and batch, ComBat's shift of the training slides
    {model}/complete.json        written last: the checkpoints' names, sizes and sha256 (and ``harmonise``)

Every model name and option is checked (each model built once, at the encoder's feature width) before any
bag is read or any file of the run is touched. Each model trains in a temporary folder that replaces its
previous folder only once whole; a failed, interrupted or killed training leaves the previous one as it was.

CORAL (``mil.feature_alignment: coral``) changes no training and no OOF prediction: the model learns the
training features as they are, and only stage 05 moves the test tiles onto the training tiles' moments. OOF
stays unaligned because the validation folds come from the training hospitals (their tiles already have the
training moments), so there is no shift to undo there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ubc_ocean import layout
from ubc_ocean.config import ConfigError, as_plain, save_config
from ubc_ocean.device import resolve_device
from ubc_ocean.encoders.identity import feature_identity, feature_width
from ubc_ocean.folds import TRAIN_ONLY, fold_split, is_synthetic
from ubc_ocean.io_utils import FailureLog, MissingInput, atomic_path, atomic_write_csv, clean_stale_temporaries
from ubc_ocean.mil import harmonise
from ubc_ocean.mil.alignment import CoralSettings, TileStatistics
from ubc_ocean.mil.bags import load_bags, load_tumour_fractions
from ubc_ocean.mil.checkpoint import save_checkpoint
from ubc_ocean.mil.predict import prediction_frame
from ubc_ocean.mil.report import seed_mean, write_report
from ubc_ocean.mil.train import check_models, epoch_selection, fit, model_training_config, training_record
from ubc_ocean.mil.tumour import FoldChoosers, TumourDataError, train_choosers
from ubc_ocean.outliers import calibrate_from_config
from ubc_ocean.sources import TRAIN
from ubc_ocean.stain_normalisation import StainReference

log = logging.getLogger(__name__)
STAGE = "04_train_cv"


def train_model(name: str, table: pd.DataFrame, bags: dict, cfg: Mapping, out: layout.ModelDir, in_dim: int,
                tumour: FoldChoosers | None = None, stain: StainReference | None = None,
                source: TileStatistics | None = None) -> dict:
    """Every fold x seed of one model, in a temporary folder that replaces ``out`` once it holds the
    checkpoints, OOF predictions, curves, metrics, outlier threshold and, last, the completion record.
    With ``tumour``, each fold's bags are cut down by that fold's tile chooser, and the final chooser is
    saved for stage 05; ``stain``, the stain reference of the features, is recorded by its sha256. A model
    with CORAL alignment saves ``source`` (the training tiles' moments) for it."""
    mil_cfg, classes = model_training_config(cfg["mil"], name), list(cfg["data"]["classes"])
    training = training_record(mil_cfg)
    coral = CoralSettings.from_config(mil_cfg)
    if coral is not None and source is None:
        raise ValueError(f"{name} aligns with CORAL (mil.feature_alignment): the training tiles' statistics are needed")
    class_index = {label: i for i, label in enumerate(classes)}
    options = dict((mil_cfg["model_options"] or {}).get(name, {}))
    device = resolve_device(cfg["runtime"]["device"])
    folds = sorted(f for f in table["fold"].unique() if f != TRAIN_ONLY)
    seeds = [int(s) for s in mil_cfg["seeds"]]
    harmoniser = harmonise.Harmoniser.from_config(mil_cfg, table)  # None when mil.harmonise is none
    replacing = out.path.exists()
    with atomic_path(out.path) as tmp:
        tmp.mkdir()
        work = layout.ModelDir(tmp)
        oof_rows, curves = [], []
        runs = [(fold, seed) for fold in folds for seed in seeds]
        bar = tqdm(runs, desc=f"{name} folds x seeds", unit="fit", dynamic_ncols=True)
        prepared: tuple[int, tuple] | None = None
        for fold, seed in bar:
            train, valid = fold_split(table, fold)  # synthetic cores train outside their parent's fold, never validate
            if prepared is None or prepared[0] != fold:  # once per fold, its seeds share it
                train_bags, train_draw, valid_bags = _fold_bags(train, valid, bags, tumour, fold)
                if harmoniser is not None:  # the fold's training bags only: validation plays unseen hospitals
                    train_bags, train_draw = harmoniser.fold(fold, train, bags, train_bags, train_draw)
                prepared = (fold, (train_bags, train_draw, valid_bags))
            train_bags, train_draw, valid_bags = prepared[1]
            result = fit(
                name, options,
                train_bags, [class_index[c] for c in train["label"]],
                valid_bags, [class_index[c] for c in valid["label"]],
                len(classes), mil_cfg, seed=int(cfg["seed"]) * 1000 + seed, device=device,
                desc=f"{name} fold {fold} seed {seed}", knn_k=int(cfg["outliers"]["knn_k"]),
                progress=functools.partial(_show_epoch, bar, fold, seed), train_draw=train_draw,
            )
            log.info("%s fold %d seed %d: best valid BA %.3f at epoch %d",
                     name, fold, seed, result.best_score, result.best_epoch)
            save_checkpoint(work.checkpoint(fold, seed), result.model, classes,
                            {"fold": int(fold), "seed": seed, "best_epoch": result.best_epoch,
                             "valid_balanced_accuracy": result.best_score, "config": as_plain(cfg),
                             "training": training,
                             "detector": result.detector.to_dict()})
            meta = valid[["slide_id", "image_id", "label", "is_tma", "fold"]].reset_index(drop=True)
            oof_rows.append(pd.concat([meta.assign(seed=seed),
                                       prediction_frame(result.valid, classes, result.detector)], axis=1))
            curves += [{"fold": int(fold), "seed": seed, **row} for row in result.curves]
        oof, scope = label_unseen_slides(cfg, pd.concat(oof_rows, ignore_index=True))
        atomic_write_csv(oof, work.oof)  # what stage 06, the benchmark and the notebooks read: honest slides only
        atomic_write_csv(pd.DataFrame(curves), work.curves)
        per_slide = seed_mean(oof, classes)
        scores, is_tma = per_slide[f"score_{cfg['outliers']['score']}"].to_numpy(), per_slide["is_tma"].to_numpy()
        threshold = calibrate_from_config(scores, is_tma, cfg["outliers"])
        notes = {"epoch_selection": epoch_selection(mil_cfg), "training": training,
                 "outlier": threshold.summary(scores, is_tma), **scope}
        facts = {"harmonise": {"method": harmonise.NONE} if harmoniser is None
                 else harmoniser.finish(work.harmonisation)}
        if stain is not None:
            facts["stain_reference"] = stain.sha256
        if tumour is not None:
            notes["tumour_scorer"] = tumour.report
            tumour.final.save(work.tumour_scorer)
            facts["tumour"] = {"file": work.tumour_scorer.name, **tumour.final.record()}
        if coral is not None and source is not None:  # (source is given whenever coral is on: checked above)
            source.save(work.source_statistics)
            facts["feature_alignment"] = coral.record(work.source_statistics.name, source)
        metrics = write_report(per_slide, classes, work.path, name, notes=notes)
        threshold.save(work.outlier)
        work.write_completion(name, folds, seeds, classes=classes, in_dim=in_dim,
                              embeddings=layout.embeddings_root(cfg).name, features=feature_identity(cfg),
                              **facts)
    if replacing:  # its test predictions went with it: stage 05 predicts with the new checkpoints
        log.info("%s: the previous training in %s was replaced", name, out.path)
    log.info("%s: OOF balanced accuracy %.3f (WSI %s, TMA %s)", name, metrics["balanced_accuracy"],
             _fmt(metrics["balanced_accuracy_wsi"]), _fmt(metrics["balanced_accuracy_tma"]))
    rates = metrics["outlier"]["in_distribution_flag_rate"]
    log.info("%s: %s %s threshold flags %s of OOF slides (WSI %s, TMA %s)", name, metrics["outlier"]["mode"],
             metrics["outlier"]["score"], _fmt(rates["all"]), _fmt(rates["wsi"]), _fmt(rates["tma"]))
    if not metrics["learned"]:
        log.warning("%s did not learn: OOF balanced accuracy %.3f is not above chance (%.3f; 99%% of label "
                    "shufflings score below %.3f). Check its training keys (lr %s, epochs %s; "
                    "mil.model_training.%s) and the features", name, metrics["balanced_accuracy"],
                    metrics["chance_balanced_accuracy"], metrics["chance_balanced_accuracy_p99"],
                    training["lr"], training["epochs"], name)
    return metrics


def _fold_bags(train: pd.DataFrame, valid: pd.DataFrame, bags: dict, tumour: FoldChoosers | None, fold: int) -> tuple:
    """``(train bags, train draw or None, valid bags)`` of one fold: as loaded, or cut down by the fold's
    tumour chooser (selected; weight mode draws the training steps' tiles instead)."""
    train_bags, valid_bags = [bags[s] for s in train["slide_id"]], [bags[s] for s in valid["slide_id"]]
    if tumour is None:
        return train_bags, None, valid_bags
    chooser = tumour.folds[fold]
    train_bags, draw = chooser.training_bags(train_bags)
    return train_bags, draw, [chooser.select(bag) for bag in valid_bags]


def require_masks(cfg: Mapping, table: pd.DataFrame) -> None:
    """With ``tumour.scorer`` on, at least one training slide must have a supplemental mask: a
    ``ConfigError`` naming the folder otherwise (before any bag is read)."""
    if not cfg["tumour"]["scorer"]:
        return
    ids = table.loc[table["source"] == TRAIN, "image_id"].astype(str)
    if not any(layout.supplemental_mask_path(cfg, image_id).is_file() for image_id in ids):
        folder = layout.supplemental_masks_dir(cfg)
        raise ConfigError(f"tumour.scorer is true, but no training slide has a supplemental mask in {folder} "
                          "({image_id}.png; data.supplemental_masks names the folder): add masks or set "
                          "tumour.scorer=false")


def tumour_choosers(cfg: Mapping, table: pd.DataFrame, bags: dict, paths: dict) -> FoldChoosers | None:
    """The tile choosers of ``tumour.scorer`` (None when off), trained before any MIL model."""
    if not cfg["tumour"]["scorer"]:
        return None
    fractions = load_tumour_fractions(paths, bags)
    folder = layout.supplemental_masks_dir(cfg)
    if not fractions:
        raise ConfigError(f"tumour.scorer is true, but no training slide's embeddings hold tumour fractions from "
                          f"the masks in {folder}: run stage 01 (it records them) and stage 03 again")
    fold_of = dict(zip(table["slide_id"], table["fold"].astype(int), strict=True))
    folds = sorted(f for f in set(fold_of.values()) if f != TRAIN_ONLY)
    try:
        return train_choosers(fold_of, bags, fractions, folds, cfg["tumour"])
    except TumourDataError as err:
        raise ConfigError(f"tumour.scorer: {err} (masks in {folder})") from None


def source_statistics(cfg: Mapping, table: pd.DataFrame, bags: dict, in_dim: int) -> TileStatistics | None:
    """The moments of every training tile (each loaded bag of ``table``, WSIs and TMAs apart) when a model
    of ``mil.models`` aligns with CORAL (``mil.feature_alignment``, per model as any training key); else None."""
    if not any(CoralSettings.from_config(model_training_config(cfg["mil"], name)) for name in cfg["mil"]["models"]):
        return None
    statistics = TileStatistics(in_dim)
    for slide_id, is_tma in zip(table["slide_id"], table["is_tma"].astype(bool), strict=True):
        statistics.add(bags[slide_id].numpy(), bool(is_tma))
    counts = statistics.counts()
    log.info("CORAL source statistics: %d training tiles (WSI %d, TMA %d) from %d bags", counts["all"],
             counts["wsi"], counts["tma"], len(table))
    return statistics


def _show_epoch(bar: tqdm, fold: int, seed: int, row: dict) -> None:
    bar.set_postfix(fold=fold, seed=seed, epoch=row["epoch"], loss=f"{row['train_loss']:.3f}",
                    valid_ba=f"{row['valid_balanced_accuracy']:.3f}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run(cfg: Mapping) -> dict:
    """Train every model in ``mil.models``; returns ``{model: metrics}``."""
    layout.require_writable(cfg, "runs")
    in_dim = feature_width(cfg)
    check_models(cfg["mil"], in_dim, len(cfg["data"]["classes"]))
    table = layout.read_training_table(cfg)
    require_masks(cfg, table)
    harmonise.require_column([model_training_config(cfg["mil"], name) for name in cfg["mil"]["models"]], table)
    root = layout.embeddings_root(cfg)
    if not root.is_dir():
        raise MissingInput(root, layout.run_stage_first("03"))
    stain = read_stain_reference(cfg, root)
    paths = layout.embedding_paths(root, table)
    bags, problems = load_bags(paths, in_dim)
    for message in problems.values():
        log.error("left out of training: %s", message)
    table = table[table["slide_id"].isin(bags)].reset_index(drop=True)
    if table.empty:
        raise RuntimeError(f"no usable bags under {root} ({len(problems)} refused, e.g. "
                           f"{next(iter(problems.values()), 'none listed')}): run stage 03 first")
    cores = int(is_synthetic(table).sum())
    if cores:
        log.info("%d synthetic TMA cores: training bags in their parent's folds, never validated", cores)
    out = layout.run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)  # trainings killed earlier; a folder caught mid-swap is put back
    save_config(cfg, out)
    failures = FailureLog(out / "failures_04.csv", STAGE)
    failures.path.unlink(missing_ok=True)
    for slide_id, message in problems.items():
        failures.record(slide_id, message)
    tumour = tumour_choosers(cfg, table, bags, paths)
    if stain is not None:  # stage 05 normalises the test tiles to the very reference of the training features
        stain.save(layout.run_stain_reference(cfg))
    source = source_statistics(cfg, table, bags, in_dim)
    return {name: train_model(name, table, bags, cfg, layout.model_dir(cfg, name), in_dim, tumour, stain, source)
            for name in cfg["mil"]["models"]}


def label_unseen_slides(cfg: Mapping, oof: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The OOF rows of the slides whose labels the encoder never saw, and the note that says so in metrics.json.

    An encoder adapted with slide labels (stage 02b's ``supcon``/``finetune``) has learnt the labels of the
    slides it trained on: their OOF predictions would flatter the model. ``oof.csv``, and so the metrics, the
    outlier threshold (calibrated on OOF scores), stage 06's OOF weights and the benchmark's OOF column, then
    hold the slides of ``adapt.label_holdout_folds`` only."""
    exposure = layout.encoder_label_exposure(cfg)
    if exposure is None:
        return oof, {}
    seen = oof["slide_id"].isin(exposure["label_slides"])
    unseen = oof[~seen].reset_index(drop=True)
    if unseen.empty:
        raise ConfigError(f"the adapted encoder ({cfg['features']['weights']}) saw the labels of every OOF slide: "
                          "no honest OOF metric is left (adapt it again with adapt.label_holdout_folds)")
    kept, left_out = unseen["slide_id"].nunique(), oof.loc[seen, "slide_id"].nunique()
    log.warning("OOF metrics on the %d slides whose labels the adapted encoder (%s) never saw; %d left out", kept,
                exposure["method"], left_out)
    return unseen, {"oof_scope": {"slides": kept, "left_out": left_out,
                                  "why": f"features.weights was adapted with labels ({exposure['method']}): "
                                         "metrics on the slides it never saw"}}


def read_stain_reference(cfg: Mapping, root: Path) -> StainReference | None:
    """With ``features.stain_normalisation`` on, stage 03's stain reference (beside the embeddings under
    ``root``), which :func:`run` copies into the run folder; a ``MissingInput`` when stage 03 wrote none.
    None with normalisation off."""
    if cfg["features"]["stain_normalisation"] == "none":
        return None
    source = layout.stain_reference_path(root)
    try:
        stain = StainReference.load(source)
    except FileNotFoundError:
        raise MissingInput(source, layout.run_stage_first("03")) from None
    except (OSError, ValueError) as err:
        raise MissingInput(source, layout.run_stage_first("03"), problem=f"is unusable ({err})") from None
    return stain
