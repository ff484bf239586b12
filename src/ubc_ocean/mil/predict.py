"""Bag-level prediction with a trained MIL model: probabilities, logits and bag embeddings, and the table
of class probabilities and outlier scores that OOF and test predictions share."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ubc_ocean.device import autocast
from ubc_ocean.mil.checkpoint import load_checkpoint
from ubc_ocean.outliers import FeatureSpaceDetector, score_table


@dataclass
class BagOutputs:
    """Model outputs for a list of bags: softmax probabilities, logits and bag embeddings."""

    probs: np.ndarray
    logits: np.ndarray
    embeddings: np.ndarray


def evenly_spaced(bag: torch.Tensor, max_instances: int) -> torch.Tensor:
    """A deterministic subsample (every k-th instance) capping very large bags at prediction time."""
    if max_instances <= 0 or bag.shape[0] <= max_instances:
        return bag
    keep = torch.linspace(0, bag.shape[0] - 1, max_instances).round().long()
    return bag[keep]


@torch.inference_mode()
def predict_bags(
    model: nn.Module, bags: Sequence[torch.Tensor], device: torch.device, precision: str = "auto",
    max_instances: int = 0,
) -> BagOutputs:
    """Probabilities [N, C], logits [N, C] and bag embeddings [N, E] for whole bags (capped at
    ``max_instances`` by an even subsample, so a 100k-instance bag cannot exhaust memory)."""
    model.eval()
    logits, embeddings = [], []
    for bag in bags:
        with autocast(device, precision):
            out = model(evenly_spaced(bag, max_instances).to(device).float())
        logits.append(out["logits"].float().cpu().numpy()[0])
        embeddings.append(out["embedding"].float().cpu().numpy()[0])
    logit_array = np.stack(logits)
    probs = torch.softmax(torch.from_numpy(logit_array), dim=-1).numpy()
    return BagOutputs(probs, logit_array, np.stack(embeddings))


def prediction_frame(outputs: BagOutputs, classes: list[str], detector: FeatureSpaceDetector | None) -> pd.DataFrame:
    """One row per bag: a probability column per class, then a ``score_*`` column per outlier score."""
    frame = pd.DataFrame(outputs.probs, columns=classes)
    for name, values in score_table(outputs.probs, outputs.logits, outputs.embeddings, detector).items():
        frame[f"score_{name}"] = values
    return frame


class CheckpointEnsemble:
    """Every fold x seed checkpoint of one model, each read once (hashed from the bytes it is loaded from):
    the mean of their :func:`prediction_frame` rows for any bags, one slide at a time or many."""

    def __init__(self, paths: Sequence[Path], device: torch.device, precision: str = "auto", max_instances: int = 0):
        self.device, self.precision, self.max_instances = device, precision, max_instances
        self.members: list[tuple[nn.Module, list[str], FeatureSpaceDetector | None]] = []
        self.used: dict[str, str] = {}  # checkpoint file name -> sha256
        for path in paths:
            data = Path(path).read_bytes()
            self.used[Path(path).name] = hashlib.sha256(data).hexdigest()
            network, payload = load_checkpoint(io.BytesIO(data), device)
            detector = FeatureSpaceDetector.from_dict(payload["detector"]) if "detector" in payload else None
            self.members.append((network, list(payload["classes"]), detector))

    def predict(self, bags: Sequence[torch.Tensor]) -> pd.DataFrame:
        """One row per bag: mean class probabilities and outlier scores over the checkpoints."""
        total = None
        for network, classes, detector in self.members:
            outputs = predict_bags(network, bags, self.device, self.precision, self.max_instances)
            frame = prediction_frame(outputs, classes, detector)
            total = frame if total is None else total + frame
        return total / len(self.members)
