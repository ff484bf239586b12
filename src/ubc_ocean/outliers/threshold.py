"""A threshold on an outlier score, calibrated on out-of-fold (in-distribution) slides only."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ubc_ocean.io_utils import atomic_write_text
from ubc_ocean.outliers.scores import check_score_name


@dataclass
class OutlierThreshold:
    """Flag a slide as an outlier when its ``score`` exceeds ``threshold``."""

    score: str
    threshold: float
    flag_rate: float

    def flag(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64) > self.threshold

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> OutlierThreshold:
        return cls(**json.loads(Path(path).read_text()))


def calibrate_threshold(oof_values: np.ndarray, score: str, flag_rate: float) -> OutlierThreshold:
    """The (1 - flag_rate) quantile of the finite OOF scores: that fraction of known-class slides is flagged."""
    check_score_name(score)
    values = np.asarray(oof_values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError(f"no finite OOF {score} score to calibrate the outlier threshold on")
    threshold = float(np.quantile(values, 1.0 - flag_rate)) if flag_rate > 0 else float("inf")
    return OutlierThreshold(score=score, threshold=threshold, flag_rate=float(flag_rate))
