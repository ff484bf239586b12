"""Multiple-instance bag classifiers (ABMIL, TransMIL, DSMIL, Chowder, PANTHER, mean-pool) behind a name registry."""

from ubc_ocean.mil import abmil, chowder, dsmil, meanpool, panther, transmil  # noqa: F401  (import registers the models)
from ubc_ocean.mil.base import MILModel
from ubc_ocean.mil.registry import (
    available_models,
    create_mil_model,
    default_training,
    mil_model_from_config,
    register,
)

__all__ = ["MILModel", "available_models", "create_mil_model", "default_training", "mil_model_from_config", "register"]
