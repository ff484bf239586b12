"""Training-side harmonisation of embeddings across hospitals (issue 26): ComBat per fold (``mil.harmonise``).

Design, as stage 04 runs it:

- **Batches.** Each training slide's batch is its value in the training-table column ``mil.harmonise_by``
  (default ``hospital``: stage 02 carries train.csv's column into the manifest; a ``stain_cluster`` column
  would do as well). A slide with the column empty (an external source's slide) is batched by its source's
  name. Harmonisation on without the column is a ``ConfigError`` at the start of stage 04.
- **Leak-free estimation.** ComBat (the maintained ``neuroCombat`` library: parametric empirical Bayes) is
  estimated once per fold on that fold's *training* slides only: no validation slide and no validation label
  enters the adjustment whose model its OOF prediction scores. The data are slide-level mean embeddings
  (``D x n_slides``; a batch of one slide still counts), with the slide label as a categorical covariate so
  the class differences are protected (fitted and kept, not removed as batch effects).
- **What is adjusted.** With ``mil.harmonise_mean_only`` (default) ComBat moves every slide of a batch by
  the same label-independent shift per feature, ``-gamma*_b * sqrt(var_pooled)`` from neuroCombat's
  estimates (tests check it against what neuroCombat does to the slide means); each tile of the slide's bag
  gets that shift, so the bag mean moves exactly as ComBat moved the slide mean. Without ``mean_only``,
  ComBat's location-scale map ``x -> a_b x + (1 - a_b) c_s - a_b gamma*_b sqrt(var_pooled)``, with
  ``a_b = 1 / sqrt(delta*_b)`` and ``c_s`` the fitted centre of the slide's own label, is applied to every
  tile. A batch with one training slide has no variance to estimate: it keeps its mean-only shift, scale 1
  (neuroCombat's own output is then NaN for every slide, its estimates for the other batches are not: hence
  the map is read from the estimates). Using the slide's label is fine because only training slides are
  mapped: their label is the training target anyway, and no validation or test feature is ever mapped with a
  label. A caution, not a leak: a batch with ``a_b`` off 1 spreads or gathers its training slides about their
  class centre, which unadjusted validation and test slides do not see; the mean-only shift has no such
  asymmetry.
- **Measured caveat of mean only.** neuroCombat's mean-only prior (as R's sva) shrinks each batch's shift
  towards its mean over features as for a batch of one slide, so part of a shift stays (about 10-20% on the
  tests' planted data). In ``tests/test_harmonise.py``'s planted confound (a hospital shift in one feature
  going with the label in training) a linear head did WORSE after mean-only ComBat than without (held-out BA
  0.65 against 0.73): it still told the hospitals apart by the rest of the shift, with a larger weight, while
  location-scale ComBat did as well as subtracting the true shifts (0.79). Benchmark before trusting either.
- **What stays unadjusted.** Validation slides and test slides (stage 05 is unchanged): they play the unseen
  hospitals. The adjustment only removes the training hospitals' differences, so the head cannot learn them
  as class evidence; the test hospitals' own shift is the business of test-side alignment.
- **When it cannot be estimated.** A fold whose design (batches + labels) leaves no residual degree of
  freedom or confounds batches with labels trains unadjusted, with a warning and its reason in the report.
- **Records.** ``{model}/harmonisation.csv`` (``layout.ModelDir.harmonisation``): per fold and batch, the
  slides, the norm of the mean shift of the batch's slides, the features' spread (norm of the per-feature
  standard deviations of the fold's training slide means), their ratio, the largest per-feature shift in
  standard deviations, the mean scale, and the status; the log says the ratios per fold. The completion
  record's ``harmonise`` names the method, column, file and the folds adjusted.
- **Cost.** One fold's training bags are held twice (adjusted copies, fp16) while that fold trains.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ubc_ocean.config import ConfigError
from ubc_ocean.io_utils import atomic_write_csv

log = logging.getLogger(__name__)
NONE, COMBAT = "none", "combat"
REPORT_COLUMNS = ["fold", "batch", "slides", "shift_norm", "spread_norm", "shift_over_spread", "max_shift_sd",
                  "mean_scale", "status"]
ADJUSTED = "adjusted"
Draw = Callable[[int, torch.Generator], torch.Tensor]


class HarmoniseError(ValueError):
    """A fold whose ComBat model cannot be estimated (too few slides, a batch confounded with a label)."""


def enabled(mil_cfg: Mapping) -> bool:
    return str(mil_cfg["harmonise"]) != NONE


def require_column(mil_cfgs: Iterable[Mapping], table: pd.DataFrame) -> None:
    """With ``mil.harmonise`` on for any model (its resolved training keys), the training table must have
    the ``mil.harmonise_by`` column and neuroCombat must import: a ``ConfigError`` otherwise, before any bag
    is read."""
    for mil_cfg in mil_cfgs:
        if not enabled(mil_cfg):
            continue
        column = str(mil_cfg["harmonise_by"])
        if column not in table.columns:
            raise ConfigError(f"mil.harmonise_by: mil.harmonise={mil_cfg['harmonise']} batches the training slides "
                              f"by column {column!r}, which the training table (stage 02's manifest) lacks; its "
                              f"columns: {', '.join(map(str, table.columns))}. Name one of them, or set "
                              "mil.harmonise=none")
        _neurocombat()
        if mil_cfg.get("bag_standardise"):
            log.warning("mil.harmonise=%s with mil.bag_standardise=true: standardising each bag removes any "
                        "per-slide shift and scale, so ComBat's per-batch map changes nothing", mil_cfg["harmonise"])


def _neurocombat() -> Callable:
    try:
        from neuroCombat import neuroCombat
    except ImportError:
        raise ConfigError("mil.harmonise=combat needs the neuroCombat package (the training extra: "
                          "pip install 'ubc-ocean[train]', or requirements.txt)") from None
    return neuroCombat


def batch_names(table: pd.DataFrame, column: str) -> pd.Series:
    """Each row's batch: its ``column`` value as text (a whole number without ``.0``), its ``source`` where
    the value is empty."""

    def text(value: object) -> str:
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value).strip()

    values = table[column].map(lambda v: "" if pd.isna(v) else text(v))
    return values.where(values != "", table["source"].astype(str))


# ------------------------------------------------------------------------------------------- ComBat itself


@dataclass(frozen=True)
class ComBatMap:
    """ComBat on ``n`` slide means as one affine map per slide, ``x -> scale * x + offset`` (``[n, D]`` each;
    scale is all ones with ``mean_only``), and neuroCombat's own output on the means (``harmonised``)."""

    batches: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    harmonised: np.ndarray

    def apply(self, means: np.ndarray) -> np.ndarray:
        return self.scale * means + self.offset


def _design_problem(batches: Sequence[str], labels: Sequence[str]) -> str | None:
    """Why ComBat's linear model (batch indicators + label dummies) cannot be fitted, or None."""
    design = pd.concat([pd.get_dummies(pd.Series(batches), dtype=float),
                        pd.get_dummies(pd.Series(labels), dtype=float, drop_first=True)], axis=1).to_numpy()
    columns, rank = design.shape[1], int(np.linalg.matrix_rank(design))
    if rank < columns:
        return ("batches and labels are confounded (e.g. a batch holds exactly the slides of one label): their "
                "effects cannot be told apart")
    if len(batches) <= columns:
        return (f"{len(batches)} training slides for {columns} batch and label terms (no residual to estimate the "
                "spread from)")
    return None


def _run(means: np.ndarray, batches: Sequence[str], labels: Sequence[str], mean_only: bool) -> dict:
    covars = pd.DataFrame({"batch": list(batches), "label": list(labels)})
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a one-slide batch's variance; handled in fit_combat
        out = _neurocombat()(means.T.astype(np.float64), covars, "batch", categorical_cols=["label"],
                             eb=True, parametric=True, mean_only=mean_only)
    log.debug("neuroCombat: %s", " | ".join(chatter.getvalue().split("\n")))
    return out


def fit_combat(means: np.ndarray, batches: Sequence[str], labels: Sequence[str], mean_only: bool) -> ComBatMap:
    """ComBat on ``means`` (``[n_slides, D]``) with ``batches`` and ``labels`` (the protected covariate),
    read back from neuroCombat's estimates as one affine map per slide (see the module docstring).
    ``HarmoniseError`` when the model cannot be estimated."""
    means = np.asarray(means, dtype=np.float64)
    batches, labels = np.asarray(batches, dtype=str), np.asarray(labels, dtype=str)
    problem = _design_problem(batches, labels)
    if problem:
        raise HarmoniseError(problem)
    out = _run(means, batches, labels, mean_only)
    est, info = out["estimates"], out["info"]
    sd = np.sqrt(np.asarray(est["var.pooled"], dtype=np.float64)[:, 0])  # [D]
    gamma, delta = np.asarray(est["gamma.star"], dtype=np.float64), np.asarray(est["delta.star"], dtype=np.float64)
    centre = (np.asarray(est["stand.mean"]) + np.asarray(est["mod.mean"])).T  # [n, D]: each slide's label's centre
    scale, offset = np.ones_like(means), np.zeros_like(means)
    shift_only = None
    for b, rows in enumerate(info["batch_info"]):
        rows = np.asarray(rows, dtype=int)
        a = 1.0 / np.sqrt(delta[b])
        if not mean_only and not (np.isfinite(a).all() and np.isfinite(gamma[b]).all()):
            if shift_only is None:  # a one-slide batch has no variance: its mean-only shift, scale 1
                shift_only = fit_combat(means, batches, labels, mean_only=True)
            scale[rows], offset[rows] = 1.0, shift_only.offset[rows]
            continue
        if mean_only:
            offset[rows] = -gamma[b] * sd
        else:
            scale[rows] = a
            offset[rows] = (1.0 - a) * centre[rows] - a * gamma[b] * sd
    if not (np.isfinite(scale).all() and np.isfinite(offset).all()):
        raise HarmoniseError("neuroCombat's estimates are not finite")
    return ComBatMap(batches, scale, offset, np.asarray(out["data"], dtype=np.float64).T)


def shift_report(fold: int, means: np.ndarray, fitted: ComBatMap) -> list[dict]:
    """One row per batch: how far ComBat moved the batch's slide means against the features' spread."""
    sd = means.std(axis=0, ddof=1) if len(means) > 1 else np.zeros(means.shape[1])
    spread = float(np.linalg.norm(sd))
    moved = fitted.apply(means) - means
    rows = []
    for batch in sorted(set(fitted.batches)):
        mask = fitted.batches == batch
        shift = moved[mask].mean(axis=0)
        norm = float(np.linalg.norm(shift))
        rows.append({"fold": int(fold), "batch": str(batch), "slides": int(mask.sum()), "shift_norm": norm,
                     "spread_norm": spread, "shift_over_spread": norm / spread if spread > 0 else float("nan"),
                     "max_shift_sd": float(np.max(np.abs(shift)[sd > 0] / sd[sd > 0], initial=0.0)),
                     "mean_scale": float(fitted.scale[mask].mean()), "status": ADJUSTED})
    return rows


# ---------------------------------------------------------------------------------------------- stage 04


class Harmoniser:
    """Stage 04's hook: per fold, ComBat on the fold's training slides (:func:`fit_combat`) and its map
    applied to every tile of their bags (as training sees them). Validation bags are never touched."""

    def __init__(self, column: str, mean_only: bool, batches: Mapping[str, str]) -> None:
        self.column, self.mean_only, self.batches = column, mean_only, dict(batches)
        self.rows: list[dict] = []

    @classmethod
    def from_config(cls, mil_cfg: Mapping, table: pd.DataFrame) -> Harmoniser | None:
        """None when ``mil.harmonise`` is off (``mil_cfg``: one model's resolved training keys)."""
        if not enabled(mil_cfg):
            return None
        column = str(mil_cfg["harmonise_by"])
        return cls(column, bool(mil_cfg["harmonise_mean_only"]),
                   dict(zip(table["slide_id"], batch_names(table, column), strict=True)))

    def fold(self, fold: int, train: pd.DataFrame, bags: Mapping[str, torch.Tensor],
             train_bags: Sequence[torch.Tensor], draw: Draw | None) -> tuple[list[torch.Tensor], Draw | None]:
        """The fold's training bags (row for row with ``train``) and draw, adjusted by the ComBat map fitted on
        the slide means of the whole ``bags`` of ``train``'s slides; unchanged when it cannot be fitted."""
        ids = list(train["slide_id"])
        means = np.stack([bags[s].float().mean(0).numpy() for s in ids]).astype(np.float64)
        batches = [self.batches[s] for s in ids]
        try:
            fitted = fit_combat(means, batches, list(train["label"].astype(str)), self.mean_only)
        except HarmoniseError as err:
            log.warning("fold %d trains unharmonised: ComBat by %s cannot be estimated: %s", fold, self.column, err)
            self.rows += [{"fold": int(fold), "batch": b, "slides": batches.count(b), "status": f"skipped: {err}"}
                          for b in sorted(set(batches))]
            return list(train_bags), draw
        report = shift_report(fold, means, fitted)
        self.rows += report
        log.info("fold %d: ComBat by %s over %d training slides (%s); shift norm / feature spread: %s", fold,
                 self.column, len(ids), "mean only" if self.mean_only else "location and scale",
                 ", ".join(f"{r['batch']} {r['shift_over_spread']:.2f}" for r in report))
        maps = {s: (torch.from_numpy(fitted.scale[i].astype(np.float32)),
                    torch.from_numpy(fitted.offset[i].astype(np.float32))) for i, s in enumerate(ids)}

        def adjust(slide_id: str, bag: torch.Tensor) -> torch.Tensor:
            scale, offset = maps[slide_id]
            moved = bag.float() + offset if self.mean_only else bag.float() * scale + offset
            return moved.to(bag.dtype)

        adjusted = [adjust(s, bag) for s, bag in zip(ids, train_bags, strict=True)]
        if draw is None:
            return adjusted, None
        return adjusted, lambda index, generator: adjust(ids[index], draw(index, generator))

    def finish(self, report: Path) -> dict:
        """Write the per-fold, per-batch report to ``report``; returns the completion record's ``harmonise``."""
        atomic_write_csv(pd.DataFrame(self.rows, columns=REPORT_COLUMNS), report)
        adjusted = sorted({int(r["fold"]) for r in self.rows if r["status"] == ADJUSTED})
        return {"method": COMBAT, "by": self.column, "mean_only": self.mean_only, "file": Path(report).name,
                "folds_adjusted": adjusted}
