"""A threshold on an outlier score, calibrated on out-of-fold (in-distribution) slides only.

Pooled (the default), one threshold flags ``flag_rate`` of all OOF slides; WSIs, about 95% of the
training set, then set it alone. Per type (``outliers.per_type_thresholds``), TMAs and WSIs each get the
threshold that flags ``flag_rate`` of their own OOF slides, and each test image is held to its type's; a
type with fewer than ``outliers.per_type_min_slides`` OOF slides keeps the pooled threshold (recorded in
``fallback``). The saved file keeps the pooled ``threshold`` either way, so files written before the
per-type fields existed load as pooled thresholds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ubc_ocean.io_utils import atomic_write_text
from ubc_ocean.outliers.scores import check_score_name

log = logging.getLogger(__name__)
TMA, WSI = "tma", "wsi"
TYPES = (WSI, TMA)


@dataclass
class OutlierThreshold:
    """Flag a slide as an outlier when its ``score`` exceeds its threshold: its type's in ``per_type``
    when calibrated per type, else the pooled ``threshold``."""

    score: str
    threshold: float  # pooled: from every OOF slide
    flag_rate: float
    per_type: dict[str, float] = field(default_factory=dict)  # {"wsi": t, "tma": t}; empty when pooled
    fallback: list[str] = field(default_factory=list)  # types left on the pooled threshold (too few slides)
    n_slides: dict[str, int] = field(default_factory=dict)  # OOF slides per type with a finite score

    @property
    def mode(self) -> str:
        return "per_type" if self.per_type else "pooled"

    def thresholds(self, n: int, is_tma: np.ndarray | None = None) -> np.ndarray:
        """Each of ``n`` slides' threshold. ``is_tma`` (true / false, NaN or None where unknown) is required
        per type; a slide of unknown type gets the pooled threshold."""
        pooled = np.full(n, self.threshold, dtype=np.float64)
        if not self.per_type:
            return pooled
        if is_tma is None:
            raise ValueError(f"the {self.score} threshold is calibrated per slide type: say which slides are TMAs")
        kind = np.array([np.nan if v is None else v for v in np.asarray(is_tma, dtype=object)], dtype=np.float64)
        if kind.shape != (n,):
            raise ValueError(f"{n} scores but {kind.size} slide types")
        return np.where(kind == 1, self.per_type[TMA], np.where(kind == 0, self.per_type[WSI], pooled))

    def flag(self, values: np.ndarray, is_tma: np.ndarray | None = None) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        return values > self.thresholds(len(values), is_tma)

    def flag_rates(self, values: np.ndarray, is_tma: np.ndarray) -> dict[str, float | None]:
        """Share of the slides flagged, overall and per type (None for a type with no slide): on OOF
        slides, the in-distribution flag rate."""
        return share_by_type(self.flag(values, is_tma), is_tma)

    def summary(self, values: np.ndarray, is_tma: np.ndarray) -> dict:
        """What a stage reports: the thresholds and the flag rate they give on ``values`` (OOF) per type."""
        return {**asdict(self), "mode": self.mode, "in_distribution_flag_rate": self.flag_rates(values, is_tma)}

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> OutlierThreshold:
        """A saved threshold; one saved before per-type thresholds existed loads as pooled."""
        return cls(**json.loads(Path(path).read_text()))


def share_by_type(flags: np.ndarray, is_tma: np.ndarray) -> dict[str, float | None]:
    """Share of true ``flags``, overall and among WSIs and TMAs (None for a type with no slide)."""
    flags, tma = np.asarray(flags, dtype=bool), np.asarray(is_tma, dtype=bool)
    subsets = {"all": np.ones_like(tma), WSI: ~tma, TMA: tma}
    return {name: float(flags[mask].mean()) if mask.any() else None for name, mask in subsets.items()}


def _quantile_threshold(values: np.ndarray, flag_rate: float) -> float:
    return float(np.quantile(values, 1.0 - flag_rate)) if flag_rate > 0 else float("inf")


def calibrate_threshold(oof_values: np.ndarray, score: str, flag_rate: float, is_tma: np.ndarray | None = None,
                        min_slides: int = 5) -> OutlierThreshold:
    """The (1 - flag_rate) quantile of the finite OOF scores: that fraction of known-class slides is flagged.

    With ``is_tma`` (one bool per score), also one threshold per slide type from that type's slides alone;
    a type with fewer than ``min_slides`` finite scores keeps the pooled threshold, with a warning."""
    check_score_name(score)
    values = np.asarray(oof_values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError(f"no finite OOF {score} score to calibrate the outlier threshold on")
    threshold = OutlierThreshold(score, _quantile_threshold(values[finite], flag_rate), float(flag_rate))
    if is_tma is None:
        return threshold
    tma = np.asarray(is_tma, dtype=bool)
    if tma.shape != values.shape:
        raise ValueError(f"{values.size} OOF scores but {tma.size} slide types")
    for name, members in ((WSI, finite & ~tma), (TMA, finite & tma)):
        count = int(members.sum())
        threshold.n_slides[name] = count
        if count < min_slides:
            log.warning("only %d OOF %s slides with a finite %s score (outliers.per_type_min_slides: %d): "
                        "%ss keep the pooled threshold %.4g", count, name.upper(), score, min_slides,
                        name.upper(), threshold.threshold)
            threshold.fallback.append(name)
            threshold.per_type[name] = threshold.threshold
        else:
            threshold.per_type[name] = _quantile_threshold(values[members], flag_rate)
    return threshold


def calibrate_from_config(oof_values: np.ndarray, is_tma: np.ndarray, outliers: Mapping) -> OutlierThreshold:
    """The threshold that the ``outliers`` config section asks for: ``score``, ``in_distribution_flag_rate``,
    per slide type when ``per_type_thresholds`` (at least ``per_type_min_slides`` slides per type)."""
    per_type = bool(outliers["per_type_thresholds"])
    return calibrate_threshold(oof_values, str(outliers["score"]), float(outliers["in_distribution_flag_rate"]),
                               is_tma=is_tma if per_type else None, min_slides=int(outliers["per_type_min_slides"]))
