"""Outlier ("Other") detection: uncertainty scores and a threshold calibrated on OOF predictions."""

from ubc_ocean.outliers.scores import SCORES, outlier_scores
from ubc_ocean.outliers.threshold import OutlierThreshold, calibrate_threshold

__all__ = ["SCORES", "OutlierThreshold", "calibrate_threshold", "outlier_scores"]
