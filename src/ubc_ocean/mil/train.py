"""Training one MIL model on one fold with one seed: AdamW, cosine schedule, class weights,
instance subsampling and feature dropout, gradient clipping, early stopping on balanced accuracy."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ubc_ocean.config import ConfigError, as_plain
from ubc_ocean.config.schema import NOT_PER_MODEL
from ubc_ocean.config.schema import defaults as schema_defaults
from ubc_ocean.device import autocast, grad_scaler, seed_everything
from ubc_ocean.metrics import balanced_accuracy
from ubc_ocean.mil import available_models, create_mil_model, default_training
from ubc_ocean.mil.bags import drop_features, sample_instances
from ubc_ocean.mil.predict import BagOutputs, predict_bags
from ubc_ocean.outliers.feature_space import FeatureSpaceDetector

log = logging.getLogger(__name__)
PERFECT = 1.0  # the highest validation balanced accuracy: best_valid training stops at the first epoch with it


@dataclass
class FitResult:
    """The best model (by validation balanced accuracy), its validation outputs, the feature-space outlier
    detector fitted on its training bags, and the curves."""

    model: nn.Module
    best_epoch: int
    best_score: float
    valid: BagOutputs
    detector: FeatureSpaceDetector | None = None
    curves: list[dict] = field(default_factory=list)

    @property
    def valid_probs(self) -> np.ndarray:
        return self.valid.probs


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (a class absent from training gets weight 0)."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    return torch.tensor(weights / weights[weights > 0].mean(), dtype=torch.float32)


def _scheduler(optimizer: torch.optim.Optimizer, mil_cfg: Mapping, total_steps: int):  # type: ignore[no-untyped-def]
    name = str(mil_cfg["schedule"])
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=float(mil_cfg["lr"]), total_steps=total_steps + 1)
    raise ValueError(f"unknown mil.schedule {name!r} (cosine | onecycle)")


def _epoch_order(labels: torch.Tensor, n_classes: int, balanced: bool, generator: torch.Generator) -> list[int]:
    """A shuffled pass over the training bags, or a class-balanced draw (with replacement) of the same size."""
    if not balanced:
        return torch.randperm(len(labels), generator=generator).tolist()
    counts = torch.bincount(labels, minlength=n_classes).float()
    weights = (1.0 / counts.clamp(min=1))[labels]
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator).tolist()


def _loss(out: Mapping[str, torch.Tensor], target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on ``logits``; models with a second stream (DSMIL) average it with ``aux_logits``."""
    loss = F.cross_entropy(out["logits"].float(), target, weight=weights)
    if "aux_logits" in out:
        loss = 0.5 * (loss + F.cross_entropy(out["aux_logits"].float(), target, weight=weights))
    return loss


def model_training_config(mil_cfg: Mapping, name: str) -> dict:
    """The ``mil`` section as model ``name`` trains with it. Precedence, lowest first: the section's keys,
    the model's own ``default_training`` (its class's values, e.g. Chowder's learning rate), then
    ``mil.model_training[name]`` (checked, like every key, when the config loads)."""
    return {**mil_cfg, **default_training(name), **((mil_cfg.get("model_training") or {}).get(name) or {})}


def training_record(resolved: Mapping) -> dict:
    """The training keys of a model's resolved section (:func:`model_training_config`), without the model
    list or options: what is saved with each checkpoint."""
    return {k: v for k, v in as_plain(resolved).items() if k not in NOT_PER_MODEL}


def _shadowed_section_keys(mil_cfg: Mapping, name: str) -> dict[str, tuple]:
    """Section keys set away from the package default that model ``name``'s own default overrides:
    ``{key: (section value, model value)}`` (``mil.model_training.<name>`` is the key to change)."""
    package, own = schema_defaults()["mil"], default_training(name)
    user = (mil_cfg.get("model_training") or {}).get(name) or {}
    return {key: (mil_cfg[key], value) for key, value in own.items()
            if key not in user and mil_cfg.get(key) != package.get(key)}


def check_models(mil_cfg: Mapping, in_dim: int, n_classes: int) -> None:
    """Build every model of ``mil.models`` once, as training will (``in_dim`` features in, its
    ``mil.model_options``), and refuse model names the registry lacks in ``mil.model_options`` and
    ``mil.model_training`` too: a one-line ``ConfigError`` naming the key, the model and the bad name or
    option with the accepted ones, in a second or two, before any bag is read or any folder touched."""
    known = available_models()
    for key in ("model_options", "model_training"):
        unknown = sorted(set(mil_cfg.get(key) or {}) - set(known))
        if unknown:
            raise ConfigError(f"mil.{key}: unknown MIL model {unknown[0]!r}; known models: {', '.join(known)}")
    for name in mil_cfg["models"]:
        key = f"mil.model_options.{name}" if name in known else "mil.models"
        try:
            create_mil_model(name, in_dim, n_classes, **dict((mil_cfg.get("model_options") or {}).get(name) or {}))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(f"{key}: {' '.join(str(err).split())}") from None
        for key, (section, own) in _shadowed_section_keys(mil_cfg, name).items():
            log.warning("%s trains with its own default %s=%s, not mil.%s=%s: set mil.model_training.%s.%s "
                        "to change it", name, key, own, key, section, name, key)


def epoch_selection(mil_cfg: Mapping) -> str:
    """``best_valid``: keep the epoch of best validation balanced accuracy and stop after ``patience``
    epochs without progress, or at once at a perfect score, which no later epoch could beat (the OOF
    predictions are then optimistic: the fold being scored chose the epoch); ``last``: train every epoch
    and keep the last (OOF predictions untouched by their labels)."""
    return str(mil_cfg["epoch_selection"])


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
    knn_k: int = 5,
    progress: Callable[[dict], None] | None = None,
    train_draw: Callable[[int, torch.Generator], torch.Tensor] | None = None,
) -> FitResult:
    """Train a fresh model, first prepared from the training bags (``MILModel.init_from_training_bags``);
    keep the epoch that ``mil.epoch_selection`` picks (see :func:`epoch_selection`), then fit the
    feature-space outlier detector on the kept model's training-bag embeddings.

    ``train_draw(index, generator)``, when given, is the bag a training step sees instead of
    ``train_bags[index]`` (the tumour scorer's weighted draw); ``train_bags`` still serve the detector."""
    seed_everything(seed)
    in_dim = int(train_bags[0].shape[1])
    options = {**dict(model_options), **({"bag_standardise": True} if mil_cfg.get("bag_standardise") else {})}
    model = create_mil_model(model_name, in_dim=in_dim, n_classes=n_classes, **options).to(device)
    # this fold's training bags only (PANTHER: prototypes), as the model's layers see them
    model.init_from_training_bags([model.input_transform(bag) for bag in train_bags], seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(mil_cfg["lr"]),
                                  weight_decay=float(mil_cfg["weight_decay"]),
                                  fused=device.type in ("cpu", "cuda"))  # one kernel for every parameter
    epochs = int(mil_cfg["epochs"])
    scheduler = _scheduler(optimizer, mil_cfg, max(1, epochs * len(train_bags)))
    weights = class_weights(train_labels, n_classes) if mil_cfg["class_weighting"] else torch.ones(n_classes)
    weights = weights.to(device)
    generator = torch.Generator().manual_seed(seed)
    mask_rng = np.random.default_rng(seed)
    targets = torch.as_tensor(list(train_labels), dtype=torch.long)
    precision, cap = str(mil_cfg["precision"]), int(mil_cfg["max_instances_predict"])
    last_epoch_kept = epoch_selection(mil_cfg) == "last"
    scaler = grad_scaler(device, precision)
    best_epoch, best_score, best_state, best_valid = -1, -1.0, None, None
    stale = 0
    curves = []
    for epoch in range(epochs):
        model.train()
        losses = []
        for index in _epoch_order(targets, n_classes, bool(mil_cfg["balanced_sampling"]), generator):
            source = train_bags[index] if train_draw is None else train_draw(index, generator)
            bag = sample_instances(source, int(mil_cfg["max_instances"]), generator).to(device).float()
            bag = drop_features(bag, float(mil_cfg["feature_dropout"]), mask_rng)
            with autocast(device, precision):
                out = model(bag)
            loss = _loss(out, targets[index : index + 1].to(device), weights)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if float(mil_cfg["grad_clip"]) > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), float(mil_cfg["grad_clip"]))
            scaler.step(optimizer)  # skipped, and the scale lowered, when fp16 gradients overflowed
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
        valid = predict_bags(model, valid_bags, device, precision, cap)
        score = balanced_accuracy(list(valid_labels), valid.probs.argmax(1).tolist())
        curves.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "valid_balanced_accuracy": score})
        log.debug("%s epoch %d loss %.4f valid BA %.3f", desc, epoch, np.mean(losses), score)
        if progress is not None:
            progress(curves[-1])
        if last_epoch_kept or score > best_score:
            best_epoch, best_score, best_valid, stale = epoch, score, valid, 0
            best_state = None if last_epoch_kept else copy.deepcopy(model.state_dict())
            if not last_epoch_kept and score >= PERFECT:
                break  # no later epoch can score higher, so none could be kept: the rest would be wasted
        else:
            stale += 1
            if stale >= int(mil_cfg["patience"]):
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    train_embeddings = predict_bags(model, train_bags, device, precision, cap).embeddings
    detector = FeatureSpaceDetector.fit(train_embeddings, list(train_labels), n_classes, k=knn_k)
    return FitResult(model, best_epoch, best_score, best_valid, detector, curves)
