"""Outlier ("Other") detection: uncertainty and feature-space scores, a threshold calibrated on OOF."""

from ubc_ocean.outliers.feature_space import FeatureSpaceDetector
from ubc_ocean.outliers.scores import PROBABILITY_SCORES, SCORE_NAMES, outlier_scores, score_table
from ubc_ocean.outliers.threshold import OutlierThreshold, calibrate_from_config, calibrate_threshold, share_by_type

__all__ = [
    "PROBABILITY_SCORES", "SCORE_NAMES", "FeatureSpaceDetector", "OutlierThreshold", "calibrate_from_config",
    "calibrate_threshold", "outlier_scores", "score_table", "share_by_type",
]
