"""How much each tile of a bag weighed in a MIL model's prediction, one number per tile.

* ABMIL: its attention weights (softmax, class-agnostic).
* DSMIL: the bag stream's attention column of the predicted class (``class_attention[:, c]``).
* Chowder: the per-tile score of the predicted class (the values its MinMax layer picks from).
* TransMIL, mean-pool and any model without per-tile outputs: gradient x input, the sum over feature
  dimensions of ``x_i * d logit_c / d x_i`` for the predicted class ``c`` (Simonyan et al. 2013; Shrikumar
  et al. 2016). Attention rollout does not fit TransMIL: its Nystrom attention has no N x N matrix to roll.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ubc_ocean.mil.checkpoint import load_checkpoint
from ubc_ocean.viz.overlay import normalise

ATTENTION, CLASS_ATTENTION, INSTANCE_SCORE, GRADIENT_X_INPUT = (
    "attention", "class attention", "instance score", "gradient x input")


@dataclass
class Relevance:
    """Per-tile relevance [N], how it was computed, and the prediction it explains."""

    values: np.ndarray
    method: str
    predicted: int
    probs: np.ndarray  # [C]


def method_for(model: nn.Module) -> str:
    """The relevance a model's own outputs give (see the module docstring)."""
    name = getattr(model, "model_name", "")
    return {"abmil": ATTENTION, "dsmil": CLASS_ATTENTION, "chowder": INSTANCE_SCORE}.get(name, GRADIENT_X_INPUT)


def instance_relevance(model: nn.Module, bag: torch.Tensor, target: int | None = None) -> Relevance:
    """Relevance of every instance of ``bag`` [N, D] for class ``target`` (default: the predicted class),
    with the model in eval mode on the bag's device."""
    model.eval()
    method = method_for(model)
    x = bag.detach().float().clone().requires_grad_(method == GRADIENT_X_INPUT)
    with torch.set_grad_enabled(method == GRADIENT_X_INPUT):
        out = model(x)
        probs = torch.softmax(out["logits"].detach().float(), dim=-1)[0]
        cls = int(probs.argmax()) if target is None else int(target)
        if method == ATTENTION:
            values = out["attention"][0]
        elif method == CLASS_ATTENTION:
            values = out["class_attention"][0, :, cls]
        elif method == INSTANCE_SCORE:
            values = out["instance_scores"][0, :, cls]
        else:
            (grad,) = torch.autograd.grad(out["logits"][0, cls], x)
            values = (grad * x).sum(dim=-1)
    return Relevance(values.detach().float().cpu().numpy(), method, cls, probs.cpu().numpy())


def ensemble_relevance(checkpoints: Sequence[Path], bag: torch.Tensor) -> Relevance:
    """Relevance averaged over several checkpoints of one model (folds x seeds), each rescaled to [0, 1]
    first, for the class their mean probabilities predict. Loads every checkpoint on the CPU."""
    if not checkpoints:
        raise ValueError("no checkpoint to explain the bag with")
    models = [load_checkpoint(path, "cpu")[0] for path in checkpoints]
    with torch.inference_mode():
        probs = np.mean([torch.softmax(m(bag.float())["logits"].float(), -1)[0].numpy() for m in models], axis=0)
    target = int(probs.argmax())
    parts = [instance_relevance(m, bag, target) for m in models]
    values = np.mean([normalise(part.values) for part in parts], axis=0)
    return Relevance(values, parts[0].method, target, probs)
