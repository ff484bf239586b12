"""Training one MIL model on one fold with one seed: AdamW, cosine schedule, class weights,
instance subsampling and feature dropout, gradient clipping, early stopping on balanced accuracy."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ubc_ocean.device import autocast, seed_everything
from ubc_ocean.metrics import balanced_accuracy
from ubc_ocean.mil import create_mil_model
from ubc_ocean.mil.bags import sample_instances

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """The best model (by validation balanced accuracy), its validation outputs and the curves."""

    model: nn.Module
    best_epoch: int
    best_score: float
    valid_probs: np.ndarray
    valid_embeddings: np.ndarray
    curves: list[dict] = field(default_factory=list)


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (a class absent from training gets weight 0)."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    return torch.tensor(weights / weights[weights > 0].mean(), dtype=torch.float32)


@torch.inference_mode()
def predict_bags(
    model: nn.Module, bags: Sequence[torch.Tensor], device: torch.device, precision: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities [N, C] and bag embeddings [N, E] for whole bags (no subsampling)."""
    model.eval()
    probs, embeddings = [], []
    for bag in bags:
        with autocast(device, precision):
            out = model(bag.to(device).float())
        probs.append(torch.softmax(out["logits"].float(), dim=-1).cpu().numpy()[0])
        embeddings.append(out["embedding"].float().cpu().numpy()[0])
    return np.stack(probs), np.stack(embeddings)


def fit(
    model_name: str,
    model_options: Mapping,
    train_bags: Sequence[torch.Tensor],
    train_labels: Sequence[int],
    valid_bags: Sequence[torch.Tensor],
    valid_labels: Sequence[int],
    n_classes: int,
    mil_cfg: Mapping,
    seed: int,
    device: torch.device,
    desc: str = "",
) -> FitResult:
    """Train a fresh model; keep the epoch with the best validation balanced accuracy."""
    seed_everything(seed)
    in_dim = int(train_bags[0].shape[1])
    model = create_mil_model(model_name, in_dim=in_dim, n_classes=n_classes, **dict(model_options)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(mil_cfg["lr"]),
                                  weight_decay=float(mil_cfg["weight_decay"]))
    epochs = int(mil_cfg["epochs"])
    total_steps = max(1, epochs * len(train_bags))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    weights = class_weights(train_labels, n_classes) if mil_cfg["class_weighting"] else torch.ones(n_classes)
    weights = weights.to(device)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(list(train_labels), dtype=torch.long)
    precision = "auto"
    best = FitResult(model, -1, -1.0, np.zeros((0, n_classes)), np.zeros((0, 0)))
    best_state = None
    stale = 0
    curves = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_bags), generator=generator).tolist()
        losses = []
        for index in order:
            bag = sample_instances(train_bags[index], int(mil_cfg["max_instances"]), generator).to(device).float()
            bag = F.dropout(bag, p=float(mil_cfg["feature_dropout"]), training=True)
            with autocast(device, precision):
                logits = model(bag)["logits"]
            loss = F.cross_entropy(logits.float(), targets[index : index + 1].to(device), weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if float(mil_cfg["grad_clip"]) > 0:
                nn.utils.clip_grad_norm_(model.parameters(), float(mil_cfg["grad_clip"]))
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        probs, embeddings = predict_bags(model, valid_bags, device, precision)
        score = balanced_accuracy(list(valid_labels), probs.argmax(1).tolist())
        curves.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "valid_balanced_accuracy": score})
        log.debug("%s epoch %d loss %.4f valid BA %.3f", desc, epoch, np.mean(losses), score)
        if score > best.best_score:
            best_state = copy.deepcopy(model.state_dict())
            best = FitResult(model, epoch, score, probs, embeddings)
            stale = 0
        else:
            stale += 1
            if stale >= int(mil_cfg["patience"]):
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    best.curves = curves
    return best
