"""The tiles encoder adaptation trains on (chosen by the stage: :func:`ubc_ocean.adaptation.stage.adaptation_data`)
and the batches it draws from them.

Batches are drawn by step, not by epoch: the tiles of step ``k`` on process ``rank`` are a seeded draw of
``(seed, rank, k)``, and so are their views. A run resumed at step ``k`` therefore draws what the killed run
would have drawn, whatever the number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ubc_ocean import tile_store

from .views import ViewMaker

UNLABELLED = -1


@dataclass
class TileSet:
    """Tiles to train on: their paths, the index of their slide's class (``-1``: unlabelled) and slide."""

    paths: list[str]
    labels: np.ndarray
    slides: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def slide_ids(self) -> list[str]:
        """The distinct slides, sorted."""
        return sorted(set(self.slides))


@dataclass
class AdaptationData:
    """The tiles of one adaptation run: ``train``, and for ``finetune`` the ``validation`` tiles; the slides
    whose labels are never read (``holdout``)."""

    train: TileSet
    validation: TileSet | None
    holdout_slides: list[str]


class StepBatches(Sampler):
    """Batches of ``(step, slot, tile)`` for steps ``start`` to ``stop - 1``: each step's tiles a seeded draw
    (without replacement within the step) of ``(seed, rank, step)``."""

    def __init__(self, tiles: int, batch_size: int, seed: int, rank: int, start: int, stop: int):
        self.tiles, self.batch_size, self.seed, self.rank = tiles, batch_size, seed, rank
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start, self.stop):
            rng = np.random.default_rng([self.seed, self.rank, step])
            picks = rng.choice(self.tiles, size=self.batch_size, replace=self.tiles < self.batch_size)
            yield [(step, slot, int(tile)) for slot, tile in enumerate(picks)]


class TileViews(Dataset):
    """A tile's views and its label, for ``(step, slot, tile)`` keys (see :class:`StepBatches`)."""

    def __init__(self, tiles: TileSet, views: ViewMaker, seed: int, rank: int):
        self.tiles, self.views, self.seed, self.rank = tiles, views, seed, rank

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[list[torch.Tensor], int]:
        step, slot, index = key
        tile = tile_store.read_tile(self.tiles.paths[index])
        return self.views(tile, (self.seed, self.rank, step, slot)), int(self.tiles.labels[index])


def collate_views(items: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stack each view position across the batch: ``[views x [B, 3, S, S]]`` and labels ``[B]``."""
    views = [torch.stack([item[0][position] for item in items]) for position in range(len(items[0][0]))]
    return views, torch.tensor([item[1] for item in items], dtype=torch.long)


def centre_views(tiles: TileSet, views: ViewMaker, size: int) -> torch.Tensor:
    """Every tile of ``tiles`` resized to ``size`` and normalised, without augmentation ([N, 3, S, S])."""
    images = []
    for path in tiles.paths:
        tile = tile_store.read_tile(path)
        if tile.shape[0] != size or tile.shape[1] != size:
            tile = cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA)
        images.append(views.normalise(tile))
    return torch.stack(images)
