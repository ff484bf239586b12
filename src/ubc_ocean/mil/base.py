"""Common base class for multiple-instance (MIL) bag classifiers: bag-shape checks and rebuildable config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn


class MILModel(nn.Module):
    """A bag classifier: one bag of instance embeddings in, one set of class logits out.

    ``forward`` takes a bag of shape ``[N, D]`` or ``[1, N, D]`` and returns a dict with

    * ``logits``: ``[1, n_classes]``,
    * ``embedding``: ``[1, embedding_dim]``, the bag representation fed to the classifier head,
    * ``attention``: ``[1, N]`` per-instance weights, only for models that have them
      (``provides_attention``).

    ``config`` holds ``name``, ``in_dim``, ``n_classes`` and the fully resolved ``options``, so that
    ``create_mil_model(**config)``-style rebuilding (see ``registry.mil_model_from_config``) gives the
    same architecture. Subclasses implement ``forward_bag`` on a validated ``[1, N, D]`` tensor.

    ``default_training`` holds the ``mil`` training keys (``lr``, ``epochs``, ...) this model needs
    where they differ from the ``mil`` section's; ``mil.model_training.<name>`` overrides them (see
    ``mil.train.model_training_config``). Each subclass says where its values come from.

    ``init_from_training_bags`` is called once per fit, before training, with the fold's training bags.

    Every model takes the common option ``bag_standardise`` (``registry.COMMON_OPTIONS``): each bag's
    instances standardised per feature over the bag (mean 0, standard deviation 1) before anything else, so
    that a per-slide shift or scale of the features (a hospital's, a scanner's) does not reach the model. It
    is stored with the model's options, so a checkpoint predicts as it was trained.
    """

    model_name: ClassVar[str] = ""
    provides_attention: ClassVar[bool] = False
    default_training: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, in_dim: int, n_classes: int, options: Mapping[str, Any], embedding_dim: int) -> None:
        super().__init__()
        for label, value in (("in_dim", in_dim), ("n_classes", n_classes), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.embedding_dim = embedding_dim
        self.config: dict[str, Any] = {
            "name": self.model_name or type(self).__name__,
            "in_dim": in_dim,
            "n_classes": n_classes,
            "options": dict(options),
        }
        self.bag_standardise = False

    def standardise_bags(self, on: bool) -> None:
        """Turn the per-bag standardisation of the instances on or off (recorded in ``config``)."""
        self.bag_standardise = bool(on)
        self.config["options"]["bag_standardise"] = self.bag_standardise

    def input_transform(self, bag: torch.Tensor) -> torch.Tensor:
        """The bag as the model's layers see it: standardised per feature over its instances when
        ``bag_standardise`` is on (a one-instance bag is only centred), else as it is."""
        if not self.bag_standardise:
            return bag
        mean = bag.mean(dim=-2, keepdim=True)
        std = bag.std(dim=-2, keepdim=True, unbiased=False) if bag.shape[-2] > 1 else torch.ones_like(mean)
        return (bag - mean) / (std + 1e-6)

    def init_from_training_bags(self, bags: Sequence[torch.Tensor], seed: int) -> None:
        """Prepare the model from one fold's training bags before its first training step (``mil.train.fit``
        calls it with the training bags only, never validation or test ones). Most models need nothing;
        PANTHER fits its prototypes here. What it sets must live in buffers, so checkpoints keep it."""

    def check_bag(self, bag: torch.Tensor) -> torch.Tensor:
        """Validate a bag and return it as ``[1, N, D]``; raise ``ValueError`` with the reason otherwise."""
        if not isinstance(bag, torch.Tensor):
            raise ValueError(f"bag must be a torch.Tensor, got {type(bag).__name__}")
        if not bag.is_floating_point():
            raise ValueError(f"bag must be a floating-point tensor, got dtype {bag.dtype}")
        if bag.dim() == 2:
            bag = bag.unsqueeze(0)
        elif bag.dim() == 3:
            if bag.shape[0] != 1:
                raise ValueError(f"only one bag at a time is supported: expected [1, N, D], got {tuple(bag.shape)}")
        else:
            raise ValueError(f"bag must have shape [N, D] or [1, N, D], got {tuple(bag.shape)}")
        n, d = bag.shape[1], bag.shape[2]
        if n == 0:
            raise ValueError("bag is empty (N == 0): at least one instance is needed")
        if d != self.in_dim:
            raise ValueError(f"bag instance dimension is {d}, but the model expects in_dim={self.in_dim}")
        return bag

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        """Classify one bag (``[N, D]`` or ``[1, N, D]``); see the class docstring for the output keys."""
        return self.forward_bag(self.input_transform(self.check_bag(bag)))

    def forward_bag(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model-specific forward on a validated ``[1, N, in_dim]`` bag."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.config['name']!r}, in_dim={self.in_dim}, n_classes={self.n_classes}"
