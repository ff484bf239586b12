"""Leave-one-class-out evaluation of the outlier scores: train on all classes but one, then ask how well
each score separates that unseen class's slides from held-out slides of the known classes (AUROC)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from ubc_ocean import layout
from ubc_ocean.device import resolve_device
from ubc_ocean.encoders.identity import feature_width
from ubc_ocean.folds import fold_split, is_synthetic
from ubc_ocean.io_utils import atomic_write_csv
from ubc_ocean.mil.bags import load_bags
from ubc_ocean.mil.predict import predict_bags
from ubc_ocean.mil.train import check_models, fit, model_training_config
from ubc_ocean.outliers.scores import score_table

log = logging.getLogger(__name__)
VALIDATION_FOLD = 0


def held_out_class_scores(
    table: pd.DataFrame,
    bags: Mapping[str, torch.Tensor],
    held_out: str,
    model_name: str,
    model_options: Mapping,
    mil_cfg: Mapping,
    seed: int,
    device: torch.device,
    knn_k: int = 5,
) -> pd.DataFrame:
    """Every outlier score of ``held_out``'s slides (unknown, ``unknown`` 1) and of the fold-0 slides of the
    other classes (known, 0): one row per slide and score (``slide_id, unknown, score, value``).

    ``table`` has ``slide_id``, ``label`` and ``fold`` (-1 for train-only slides). The model trains on the
    known classes outside fold 0 and early-stops on fold 0.
    """
    known = table[table["label"] != held_out]
    unknown = table[(table["label"] == held_out) & ~is_synthetic(table)]  # real slides are scored, never cores
    classes = sorted(known["label"].unique())
    index = {label: i for i, label in enumerate(classes)}
    train, valid = fold_split(known, VALIDATION_FOLD)
    if valid.empty or unknown.empty:
        raise ValueError(f"held-out class {held_out!r}: need fold-{VALIDATION_FOLD} known slides and unknown slides")
    result = fit(
        model_name, model_options,
        [bags[s] for s in train["slide_id"]], [index[c] for c in train["label"]],
        [bags[s] for s in valid["slide_id"]], [index[c] for c in valid["label"]],
        len(classes), mil_cfg, seed, device, desc=f"without {held_out}", knn_k=knn_k,
    )
    outside = predict_bags(result.model, [bags[s] for s in unknown["slide_id"]], device,
                           str(mil_cfg["precision"]), int(mil_cfg["max_instances_predict"]))
    inside_scores = score_table(result.valid.probs, result.valid.logits, result.valid.embeddings, result.detector)
    outside_scores = score_table(outside.probs, outside.logits, outside.embeddings, result.detector)
    slides = [*valid["slide_id"], *unknown["slide_id"]]
    truth = np.r_[np.zeros(len(valid), int), np.ones(len(unknown), int)]
    return pd.concat([pd.DataFrame({"slide_id": slides, "unknown": truth, "score": name,
                                    "value": np.r_[inside_scores[name], outside_scores[name]]})
                      for name in inside_scores], ignore_index=True)


def auroc_table(scores: pd.DataFrame) -> pd.DataFrame:
    """AUROC of unknown against known slides per group of ``scores`` (every column but ``slide_id``,
    ``unknown`` and ``value``: model, held-out class, score)."""
    keys = [c for c in scores.columns if c not in ("slide_id", "unknown", "value")]
    rows = [{**dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True)),
             "auroc": float(roc_auc_score(group["unknown"], group["value"]))}
            for key, group in scores.groupby(keys, sort=False)]
    return pd.DataFrame(rows)


def leave_one_class_out_scores(
    table: pd.DataFrame, bags: Mapping[str, torch.Tensor], classes: Sequence[str], model_name: str,
    model_options: Mapping, mil_cfg: Mapping, seed: int, device: torch.device, knn_k: int = 5,
) -> pd.DataFrame:
    """:func:`held_out_class_scores` for every class of ``classes`` in turn, with ``model`` and
    ``held_out`` columns."""
    frames = []
    for held_out in classes:
        scores = held_out_class_scores(table, bags, held_out, model_name, model_options, mil_cfg, seed, device,
                                       knn_k)
        frames.append(scores.assign(model=model_name, held_out=held_out))
        aurocs = auroc_table(scores).set_index("score")["auroc"]
        log.info("%s without %s: %s", model_name, held_out, aurocs.round(3).to_dict())
    columns = ["model", "held_out", "score", "slide_id", "unknown", "value"]
    return pd.concat(frames, ignore_index=True)[columns]


def leave_one_class_out(
    table: pd.DataFrame, bags: Mapping[str, torch.Tensor], classes: Sequence[str], model_name: str,
    model_options: Mapping, mil_cfg: Mapping, seed: int, device: torch.device, knn_k: int = 5,
) -> pd.DataFrame:
    """One row per (held-out class, score) with the AUROC."""
    return auroc_table(leave_one_class_out_scores(table, bags, classes, model_name, model_options, mil_cfg,
                                                  seed, device, knn_k))


def run(cfg: Mapping) -> pd.DataFrame:
    """Leave-one-class-out AUROC for every model in ``mil.models``; writes ``{run}/loco_auroc.csv`` and the
    per-slide scores behind it, ``{run}/loco_scores.csv``."""
    in_dim = feature_width(cfg)
    check_models(cfg["mil"], in_dim, len(cfg["data"]["classes"]))
    table = layout.read_training_table(cfg)
    bags, _ = load_bags(layout.embedding_paths(layout.embeddings_root(cfg), table), in_dim)
    table = table[table["slide_id"].isin(bags)]
    device = resolve_device(cfg["runtime"]["device"])
    options = cfg["mil"]["model_options"] or {}
    scores = pd.concat([
        leave_one_class_out_scores(table, bags, list(cfg["data"]["classes"]), name, dict(options.get(name, {})),
                                   model_training_config(cfg["mil"], name), int(cfg["seed"]), device,
                                   int(cfg["outliers"]["knn_k"]))
        for name in cfg["mil"]["models"]
    ], ignore_index=True)
    result = auroc_table(scores)
    out = layout.loco_path(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(scores, layout.loco_scores_path(cfg))
    atomic_write_csv(result, out)
    summary = result.pivot_table(index=["model", "held_out"], columns="score", values="auroc")
    log.info("leave-one-class-out AUROC (%s):\n%s", out, summary.round(3).to_string())
    return result
