"""Cross-validation folds: stratified on label x is_tma, grouped when a group column is named (a hospital, a
patient, a stain cluster: ``folds.group_by``), so that each validation fold plays groups its models never saw.

External slides are train-only: their fold is -1 and they never validate. A synthetic bag cut from a slide
(a synthetic TMA core: ``parent_image_id`` names its slide) takes its parent's fold, so it never trains a
model that validates on its parent, and it never validates (:func:`fold_split`).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
TRAIN_ONLY = -1
PARENT = "parent_image_id"  # manifest column: the slide a synthetic bag was cut from (empty for real slides)


def stratum(frame: pd.DataFrame, n_splits: int) -> pd.Series:
    """``label|tma`` or ``label|wsi``; a label with a stratum smaller than ``n_splits`` uses the label alone."""
    label = frame["label"].astype(str)
    key = label + "|" + np.where(frame["is_tma"].astype(bool), "tma", "wsi")
    small = key.map(key.value_counts()) < n_splits
    collapse = label.isin(set(label[small]))
    return key.where(~collapse, label)


def assign_folds(
    frame: pd.DataFrame,
    n_splits: int,
    seed: int,
    group_column: str | None = None,
    validate_mask: pd.Series | None = None,
) -> pd.Series:
    """Fold number per row (``TRAIN_ONLY`` where ``validate_mask`` is False); with ``group_column`` (a column of
    ``frame``), the rows of one group share a fold.

    A class with fewer validating slides than folds is spread over as many folds as it has slides (the
    other folds cannot validate it; :func:`small_classes` names such classes). Raises ``ValueError`` when no
    class has enough slides for ``n_splits`` folds, or there are fewer groups than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # only where folds are drawn

    folds = pd.Series(TRAIN_ONLY, index=frame.index, dtype=int)
    mask = validate_mask if validate_mask is not None else pd.Series(True, index=frame.index)
    pool = frame[mask]
    if pool["label"].value_counts().max() < n_splits:
        raise ValueError(f"no class has {n_splits} slides: lower folds.n_splits")
    strata = stratum(pool, n_splits)
    if group_column:
        if group_column not in pool.columns:
            raise ValueError(f"group column '{group_column}' is not a manifest column")
        groups = pool[group_column].astype(str)
        if groups.nunique() < n_splits:
            raise ValueError(f"{groups.nunique()} groups ({', '.join(sorted(groups.unique())[:10])}) cannot fill "
                             f"{n_splits} folds: lower folds.n_splits or group by something finer (folds.group_by)")
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(pool, strata, groups=groups)
    else:
        splits = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(pool, strata)
    with warnings.catch_warnings():  # small classes are reported by small_classes(), not by sklearn
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, valid_idx) in enumerate(splits):
            folds.loc[pool.index[valid_idx]] = fold
    return folds


def small_classes(frame: pd.DataFrame, n_splits: int, validate_mask: pd.Series | None = None) -> dict[str, int]:
    """Classes with fewer validating slides than folds, and their counts."""
    pool = frame if validate_mask is None else frame[validate_mask]
    counts = pool["label"].value_counts()
    return {str(label): int(count) for label, count in counts[counts < n_splits].items()}


def is_synthetic(frame: pd.DataFrame) -> pd.Series:
    """True for the rows that are synthetic bags of another slide (a ``parent_image_id``)."""
    if PARENT not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame[PARENT].notna() & frame[PARENT].astype(str).str.len().gt(0)


def parent_folds(frame: pd.DataFrame, folds: pd.Series) -> pd.Series:
    """``folds`` with each synthetic row given its parent's fold (the parent: the row of the same
    ``source`` whose ``image_id`` is the ``parent_image_id``). Raises ``ValueError`` for an orphan."""
    synthetic = is_synthetic(frame)
    if not synthetic.any():
        return folds
    own = dict(zip(zip(frame["source"], frame["image_id"].astype(str), strict=True), folds, strict=True))
    parents = list(zip(frame.loc[synthetic, "source"], frame.loc[synthetic, PARENT].astype(str), strict=True))
    missing = [f"{source}/{parent}" for source, parent in parents if (source, parent) not in own]
    if missing:
        raise ValueError(f"synthetic bags whose parent slide is not in the manifest: {missing[:5]}")
    result = folds.copy()
    result.loc[synthetic] = [own[key] for key in parents]
    return result


def fold_split(table: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, valid)`` rows for ``fold``: training takes every row of the other folds (train-only and
    synthetic ones included), validation only the real slides of ``fold`` (a synthetic bag never validates,
    and never trains while its parent validates)."""
    in_fold = table["fold"] == fold
    return table[~in_fold], table[in_fold & ~is_synthetic(table)]
