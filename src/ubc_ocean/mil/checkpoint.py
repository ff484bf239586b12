"""Checkpoints that rebuild themselves: weights plus the model's constructor arguments and classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from ubc_ocean.io_utils import atomic_path
from ubc_ocean.mil import create_mil_model


def save_checkpoint(path: Path, model: nn.Module, classes: Sequence[str], extra: Mapping) -> None:
    """Write weights (CPU tensors), ``model.config`` and the class order, atomically."""
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": dict(model.config),
        "classes": list(classes),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path | BinaryIO, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint (a path, or its bytes in a file object); returns ``(model in eval
    mode, payload)``."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    config = payload["model_config"]
    model = create_mil_model(config["name"], in_dim=config["in_dim"], n_classes=config["n_classes"],
                             **config.get("options", {}))
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload


def checkpoint_in_dim(path: str | Path) -> int:
    """The feature width the checkpoint's model takes (``model_config["in_dim"]``), nothing rebuilt."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    return int(payload["model_config"]["in_dim"])
