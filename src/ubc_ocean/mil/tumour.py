"""A tile-level tumour scorer learnt from the supplemental masks, and the tile choice it drives.

Target: a tile is tumour when its mask marks at least half of it tumour (``tumour_fraction >= 0.5``) and not
tumour when its mask marks none of it (``0``); tiles in between are ambiguous and left out of training and
of the AUC, as are tiles of slides without a mask (NaN). The scorer is a logistic regression on
standardised tile embeddings (scikit-learn), saved as plain numbers in JSON (no pickle).

A :class:`TileChooser` cuts each bag down with it: ``select`` keeps the ``keep_fraction`` most tumour-like
tiles (at least ``min_tiles``, all when the bag is smaller), in their original order; ``weight`` draws as
many tiles in training with probability proportional to the score, and selects as ``select`` does for
prediction. Stage 04 trains one scorer per fold on the fold's training slides (so a validation slide's
mask never chooses its own tiles) and one on every masked training slide for stage 05.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ubc_ocean.io_utils import atomic_write_text

log = logging.getLogger(__name__)

TUMOUR_AT = 0.5  # a tile is tumour when at least this share of it is tumour in its mask
FIT_TILES_PER_SLIDE = 512  # a seeded sample of each slide's usable tiles trains the scorer (memory: 150 real masked
                           # WSIs x 2000 tiles x 768 features would be 1.8 GB in float64)
MODES = ("select", "weight")
_SCORE_FLOOR = 1e-6  # every tile keeps a chance to be drawn in weight mode


class TumourDataError(ValueError):
    """Masked tiles that cannot train a scorer (none, or only one kind)."""


def tile_targets(fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(usable, is_tumour)`` per tile: usable when the fraction is 0 or at least :data:`TUMOUR_AT`."""
    fractions = np.asarray(fractions, dtype=np.float64)
    tumour = fractions >= TUMOUR_AT
    return tumour | (fractions == 0), tumour


def _labelled(features: Sequence, fractions: Sequence[np.ndarray], per_slide: int = 0,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The usable tiles of every bag, stacked: features [M, D] float64 and targets [M] (0/1); with
    ``per_slide`` > 0, a seeded sample of at most that many of each bag's."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for bag, fraction in zip(features, fractions, strict=True):
        usable, tumour = tile_targets(fraction)
        rows = np.flatnonzero(usable)
        if 0 < per_slide < len(rows):
            rows = np.sort(rng.choice(rows, per_slide, replace=False))
        xs.append(_as_array(bag[rows] if isinstance(bag, torch.Tensor) else np.asarray(bag)[rows]))
        ys.append(tumour[rows])
    if not xs:
        return np.zeros((0, 0)), np.zeros(0, bool)
    return np.concatenate(xs), np.concatenate(ys)


def _both_kinds(targets: np.ndarray) -> bool:
    """Whether the usable tiles hold tumour and tumour-free ones (a scorer and an AUC need both)."""
    return bool(targets.any()) and not bool(targets.all())


def _as_array(bag: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(bag, torch.Tensor):
        bag = bag.detach().cpu().float().numpy()
    return np.asarray(bag, dtype=np.float64)


@dataclass(frozen=True)
class TumourScorer:
    """``P(tumour | tile embedding)``: a logistic regression on standardised features."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    tiles: int = 0  # tiles it was trained on
    slides: int = 0

    @classmethod
    def fit(cls, features: Sequence, fractions: Sequence[np.ndarray], c: float = 1.0,
            per_slide: int = FIT_TILES_PER_SLIDE, seed: int = 0) -> TumourScorer:
        """Train on the usable tiles of the given bags (features [N_i, D], fractions [N_i]; at most
        ``per_slide`` of each, seeded); classes are weighted inversely to their frequency. Raises
        :class:`TumourDataError` without both kinds of tile."""
        from sklearn.linear_model import LogisticRegression

        x, y = _labelled(features, fractions, per_slide, seed)
        if not _both_kinds(y):
            raise TumourDataError(f"the masked tiles hold {int(y.sum())} tumour (fraction >= {TUMOUR_AT}) and "
                                  f"{int((~y).sum())} tumour-free tiles: a scorer needs both")
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 0, scale, 1.0)
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
        model.fit((x - mean) / scale, y)
        return cls(mean, scale, model.coef_[0].astype(np.float64), float(model.intercept_[0]), len(y),
                   len(features))

    def score(self, bag: np.ndarray | torch.Tensor) -> np.ndarray:
        """Tumour probability of each tile of ``bag`` [N, D] -> [N]."""
        logits = ((_as_array(bag) - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))

    def auc(self, features: Sequence, fractions: Sequence[np.ndarray]) -> tuple[float | None, int]:
        """Tile AUC on the usable tiles of the given bags (None without both kinds), and their count."""
        from sklearn.metrics import roc_auc_score

        x, y = _labelled(features, fractions)
        if not _both_kinds(y):
            return None, len(y)
        return float(roc_auc_score(y, self.score(x))), len(y)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept, "tiles": self.tiles, "slides": self.slides}

    @classmethod
    def from_dict(cls, data: Mapping) -> TumourScorer:
        return cls(np.asarray(data["mean"], np.float64), np.asarray(data["scale"], np.float64),
                   np.asarray(data["coef"], np.float64), float(data["intercept"]), int(data.get("tiles", 0)),
                   int(data.get("slides", 0)))


def kept_count(n: int, keep_fraction: float, min_tiles: int) -> int:
    """How many of a bag's ``n`` tiles are kept: ``ceil(keep_fraction * n)``, at least ``min_tiles``, at most ``n``."""
    return min(n, max(int(min_tiles), math.ceil(float(keep_fraction) * n)))


@dataclass(frozen=True)
class TileChooser:
    """How bags are cut down by tumour score (see the module's notes)."""

    scorer: TumourScorer
    mode: str = "select"
    keep_fraction: float = 0.5
    min_tiles: int = 8

    @classmethod
    def from_config(cls, scorer: TumourScorer, tumour_cfg: Mapping) -> TileChooser:
        return cls(scorer, str(tumour_cfg["mode"]), float(tumour_cfg["keep_fraction"]), int(tumour_cfg["min_tiles"]))

    def keep(self, scores: np.ndarray) -> np.ndarray:
        """Indices of the kept tiles: the highest scores (ties by position), in their original order."""
        k = kept_count(len(scores), self.keep_fraction, self.min_tiles)
        order = np.argsort(-np.asarray(scores), kind="stable")[:k]
        return np.sort(order)

    def select(self, bag: torch.Tensor, scores: np.ndarray | None = None) -> torch.Tensor:
        """The bag's kept tiles (what validation and test bags become in both modes); ``scores``: the bag's
        tumour scores when already computed."""
        return bag[torch.from_numpy(self.keep(self.scorer.score(bag) if scores is None else scores))]

    def draw(self, bag: torch.Tensor, scores: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """Weight mode's training draw: as many tiles as :meth:`keep` keeps, without replacement, each
        with probability proportional to its score, in their original order."""
        k = kept_count(len(scores), self.keep_fraction, self.min_tiles)
        weights = torch.from_numpy(np.maximum(np.asarray(scores, np.float64), _SCORE_FLOOR))
        chosen = torch.multinomial(weights, k, replacement=False, generator=generator)
        return bag[torch.sort(chosen).values]

    def training_bags(self, bags: Sequence[torch.Tensor]
                      ) -> tuple[list[torch.Tensor], Callable[[int, torch.Generator], torch.Tensor] | None]:
        """Training bags as selected, and, in weight mode, the draw that training uses instead (by the
        bag's position in ``bags``); None in select mode."""
        scores = [self.scorer.score(bag) for bag in bags]
        selected = [self.select(bag, s) for bag, s in zip(bags, scores, strict=True)]
        if self.mode != "weight":
            return selected, None
        return selected, lambda index, generator: self.draw(bags[index], scores[index], generator)

    def record(self) -> dict:
        """The choice's settings (without the scorer's numbers), as metrics and completion records say them."""
        return {"mode": self.mode, "keep_fraction": self.keep_fraction, "min_tiles": self.min_tiles}

    def save(self, path: Path) -> Path:
        return atomic_write_text(path, json.dumps({**self.record(), "scorer": self.scorer.to_dict()}))

    @classmethod
    def load(cls, path: Path) -> TileChooser:
        """A saved chooser; ``ValueError`` naming the file when it is not one."""
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_config(TumourScorer.from_dict(data["scorer"]), data)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is not a tumour scorer file ({err})") from None


@dataclass
class FoldChoosers:
    """One chooser per validation fold (trained without that fold's slides), the final one (every masked
    training slide: used at test) and the report for ``metrics.json``."""

    folds: dict[int, TileChooser]
    final: TileChooser
    report: dict


def train_choosers(fold_of: Mapping[str, int], bags: Mapping[str, torch.Tensor],
                   fractions: Mapping[str, np.ndarray], folds: Sequence[int], tumour_cfg: Mapping) -> FoldChoosers:
    """Per validation fold, a scorer on the masked slides outside it (``fold_of``: slide -> fold; train-only
    slides count everywhere), its tile AUC on the fold's masked slides; and a final scorer on them all.
    ``fractions`` holds the masked slides only. Raises :class:`TumourDataError` when a fold's training
    slides cannot train one."""
    masked = sorted(fractions)
    rows, choosers = [], {}
    for fold in folds:
        train = [s for s in masked if fold_of[s] != fold]
        valid = [s for s in masked if fold_of[s] == fold]
        try:
            scorer = TumourScorer.fit([bags[s] for s in train], [fractions[s] for s in train])
        except TumourDataError as err:
            raise TumourDataError(f"fold {fold}: its {len(train)} masked training slides cannot train the tumour "
                                  f"scorer: {err}") from None
        auc, tiles = scorer.auc([bags[s] for s in valid], [fractions[s] for s in valid])
        rows.append({"fold": int(fold), "train_slides": len(train), "train_tiles": scorer.tiles,
                     "valid_slides": len(valid), "valid_tiles": tiles, "tile_auc": auc})
        choosers[fold] = TileChooser.from_config(scorer, tumour_cfg)
        log.info("tumour scorer, fold %d: trained on %d tiles of %d masked slides; held-out tile AUC %s "
                 "(%d tiles of %d slides)", fold, scorer.tiles, len(train),
                 "n/a" if auc is None else f"{auc:.3f}", tiles, len(valid))
    final = TileChooser.from_config(TumourScorer.fit([bags[s] for s in masked], [fractions[s] for s in masked]),
                                    tumour_cfg)
    aucs = [row["tile_auc"] for row in rows if row["tile_auc"] is not None]
    report = {**final.record(), "masked_slides": len(masked),
              "tile_auc_held_out": float(np.mean(aucs)) if aucs else None, "folds": rows,
              "test_scorer": {"slides": final.scorer.slides, "tiles": final.scorer.tiles}}
    return FoldChoosers(choosers, final, report)
