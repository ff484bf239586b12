"""Which tiles encoder adaptation trains on, and the batches it draws from them.

The tiles are stage 01's, of the training slides (source ``train``) and of the external sources named in
``adapt.sources``; never a test image's. A method that reads labels (``supcon``, ``finetune``) leaves out
every slide of ``adapt.label_holdout_folds`` (stage 04 then reports OOF metrics on those slides only), and
``finetune`` validates on the lowest other fold.

Batches are drawn by step, not by epoch: the tiles of step ``k`` on process ``rank`` are a seeded draw of
``(seed, rank, k)``, and so are their views. A run resumed at step ``k`` therefore draws what the killed run
would have drawn, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from ubc_ocean import layout, tile_store
from ubc_ocean.config import ConfigError
from ubc_ocean.sources import TRAIN

from .views import ViewMaker

log = logging.getLogger(__name__)

LABELLED_METHODS = ("supcon", "finetune")
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


def _tile_set(cfg: Mapping, table: pd.DataFrame, classes: Sequence[str], count: int, seed: int) -> TileSet:
    """``count`` tiles (0: all) spread over the complete tile folders of ``table``'s slides."""
    folders = {row.slide_id: layout.slide_tiles_dir(cfg, row.source, row.image_id) for row in table.itertuples()}
    if count > 0:
        chosen = tile_store.sample_tiles(folders, count, seed)
    else:
        chosen = [(f"{slide}/{name}", folder / name) for slide, folder in sorted(folders.items())
                  if tile_store.is_complete(folder) for name in tile_store.read_index(folder)["file"]]
    label_of = dict(zip(table["slide_id"], table["label"], strict=True))
    index = {name: i for i, name in enumerate(classes)}
    slides = [name.rsplit("/", 1)[0] for name, _ in chosen]
    labels = np.array([index.get(str(label_of[slide]), UNLABELLED) for slide in slides], dtype=np.int64)
    return TileSet([str(path) for _, path in chosen], labels, slides)


def adaptation_data(cfg: Mapping) -> AdaptationData:
    """The tiles ``cfg``'s adaptation trains (and, for ``finetune``, validates) on; a ``ConfigError`` when an
    ``adapt.sources`` entry is not in the manifest or no tile is left."""
    adapt = cfg["adapt"]
    table = layout.read_training_table(cfg)
    wanted = [TRAIN, *adapt["sources"]]
    unknown = sorted(set(adapt["sources"]) - set(table["source"]))
    if unknown:
        raise ConfigError(f"adapt.sources names {unknown}, which the manifest does not hold (stage 02's sources: "
                          f"{sorted(set(table['source']) - {TRAIN})})")
    table = table[table["source"].isin(wanted)]
    classes = list(cfg["data"]["classes"])
    holdout: list[str] = []
    validation = None
    seed = int(cfg["seed"])
    if adapt["method"] in LABELLED_METHODS:
        held = table["fold"].isin(adapt["label_holdout_folds"])
        holdout = sorted(table.loc[held, "slide_id"])
        table = table[~held & table["label"].isin(classes)]
        if adapt["method"] == "finetune":
            validation_fold = min(set(table.loc[table["fold"] >= 0, "fold"]), default=None)
            if validation_fold is None:
                raise ConfigError("adapt.method=finetune validates on a fold outside adapt.label_holdout_folds: "
                                  "none is left")
            in_validation = table["fold"] == validation_fold
            validation = _tile_set(cfg, table[in_validation], classes, 512, seed + 1)
            table = table[~in_validation]
    train = _tile_set(cfg, table, classes, int(adapt["max_tiles"]), seed)
    if len(train) < int(adapt["batch_size"]):
        raise ConfigError(f"encoder adaptation found {len(train)} tiles to train on (sources {wanted}), fewer than "
                          f"adapt.batch_size ({adapt['batch_size']}): run stage 01, or lower adapt.batch_size")
    log.info("adaptation: %d tiles of %d slides%s", len(train), len(train.slide_ids),
             f"; {len(holdout)} slides of folds {list(adapt['label_holdout_folds'])} held out" if holdout else "")
    return AdaptationData(train, validation, holdout)


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
