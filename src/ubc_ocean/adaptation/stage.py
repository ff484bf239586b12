"""Stage 02b (optional): adapt the configured encoder to the competition's tiles.

Reads stage 01's tiles and stage 02's manifest and folds; trains ``features.encoder`` (from
``features.weights``) with ``adapt.method`` on what ``adapt.trainable`` opens; writes
``{processed}/encoders/{adapt.name}/`` (:mod:`ubc_ocean.adaptation.output`). A finished run with the same
settings is not run again; an unfinished one (killed, or stopped by ``adapt.max_minutes``) continues from its
checkpoint. Under ``torchrun --nproc_per_node N`` every process runs this with the same config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from ubc_ocean import layout, tile_store
from ubc_ocean.config import ConfigError, save_config
from ubc_ocean.config.schema import LABELLED_ADAPT_METHODS
from ubc_ocean.device import resolve_device, seed_everything
from ubc_ocean.encoders.registry import Encoder, create_encoder
from ubc_ocean.encoders.weights import file_checksum
from ubc_ocean.metrics import balanced_accuracy
from ubc_ocean.sources import TRAIN

from .data import (
    UNLABELLED,
    AdaptationData,
    StepBatches,
    TileSet,
    TileViews,
    centre_views,
    collate_views,
)
from .lora import is_vit, trainable_parameters
from .objectives import FineTune, Objective, build_objective
from .output import (
    learning_verdict,
    library_versions,
    read_record,
    save_weights,
    write_curve,
    write_record,
)
from .trainable import make_trainable, plain_timm_module, timm_module
from .trainer import Distributed, Trainer, distributed_from_environment
from .views import ViewMaker

log = logging.getLogger(__name__)

# Settings that do not change what is learned: a run that differs only in these continues the same training.
RUN_ONLY = ("max_minutes", "checkpoint_every", "log_every", "num_workers", "name")


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


def validation_groups(table: pd.DataFrame, share: float, seed: int) -> list[str]:
    """A seeded ``share`` of the competition slides' groups of each class (at least one where a class has two
    or more): finetune's early-stopping set. Groups, not slides: a synthetic TMA core and its WSI stay together."""
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    competition = table[table["fold"] >= 0]
    for _, rows in competition.groupby("label", sort=True):
        groups = sorted(set(rows["group"].astype(str)))
        if len(groups) >= 2:
            count = min(len(groups) - 1, max(1, round(share * len(groups))))
            chosen += [str(g) for g in rng.choice(groups, size=count, replace=False)]
    return chosen


def adaptation_data(cfg: Mapping) -> AdaptationData:
    """The tiles ``cfg``'s adaptation trains (and, for ``finetune``, validates) on: stage 01's tiles of the
    training slides (source ``train``) and of the external sources named in ``adapt.sources``, never a test
    image's. A method that reads labels (``supcon``, ``finetune``) leaves out every slide of
    ``adapt.label_holdout_folds`` (stage 04 then reports OOF metrics on those slides only), and ``finetune``
    validates on ``adapt.validation_share`` of the other slides (:func:`validation_groups`). A ``ConfigError``
    when an ``adapt.sources`` entry is not in the manifest or too few tiles are left."""
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
    if adapt["method"] in LABELLED_ADAPT_METHODS:
        held = table["fold"].isin(adapt["label_holdout_folds"])
        holdout = sorted(table.loc[held, "slide_id"])
        table = table[~held & table["label"].isin(classes)]
        if adapt["method"] == "finetune":
            chosen = validation_groups(table, float(adapt["validation_share"]), seed)
            in_validation = table["group"].astype(str).isin(chosen)
            if not in_validation.any():
                raise ConfigError("adapt.method=finetune keeps some competition slides outside "
                                  "adapt.label_holdout_folds for early stopping: none is left")
            validation = _tile_set(cfg, table[in_validation], classes, 512, seed + 1)
            table = table[~in_validation]
    train = _tile_set(cfg, table, classes, int(adapt["max_tiles"]), seed)
    if len(train) < int(adapt["batch_size"]):
        raise ConfigError(f"encoder adaptation found {len(train)} tiles to train on (sources {wanted}), fewer than "
                          f"adapt.batch_size ({adapt['batch_size']}): run stage 01, or lower adapt.batch_size")
    log.info("adaptation: %d tiles of %d slides%s", len(train), len(train.slide_ids),
             f"; {len(holdout)} slides of folds {list(adapt['label_holdout_folds'])} held out" if holdout else "")
    return AdaptationData(train, validation, holdout)


def require_libraries(adapt: Mapping) -> None:
    """A ``ConfigError`` naming the extra when lightly (the SSL objectives) or peft (LoRA) is missing."""
    needed = ["lightly"] if adapt["method"] != "finetune" else []
    needed += ["peft"] if adapt["trainable"] == "lora" else []
    import importlib.util

    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"adapt.method={adapt['method']} with adapt.trainable={adapt['trainable']} needs "
                          f"{', '.join(missing)}: pip install '.[adapt]' (or -r requirements.txt)")


def starting_weights(cfg: Mapping) -> str | None:
    """What stage 02b adapts: ``adapt.base_weights`` when set; else ``features.weights``, unless that names this
    stage's own output (``features.weights: adapted``), when it starts from the encoder's offline default."""
    adapt = cfg["adapt"]
    if adapt["base_weights"]:
        if adapt["base_weights"] != "hub" and not Path(adapt["base_weights"]).is_file():
            raise ConfigError(f"adapt.base_weights names no file: {adapt['base_weights']}")
        return str(adapt["base_weights"])
    return None if layout.uses_adapted_encoder(cfg) else cfg["features"]["weights"]


def settings_signature(cfg: Mapping, base_identity: str, input_size: int, world: int) -> str:
    """What decides the training (a checkpoint of other settings is not continued)."""
    adapt = {key: value for key, value in cfg["adapt"].items() if key not in RUN_ONLY}
    facts = {"adapt": adapt, "encoder": cfg["features"]["encoder"], "base_weights": base_identity,
             "input_size": input_size, "seed": int(cfg["seed"]), "tiling_key": layout.tiling_key(cfg),
             "classes": list(cfg["data"]["classes"]), "world": world}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def step_batches(data: AdaptationData, views: ViewMaker, adapt: Mapping, seed: int,
                 distributed: Distributed) -> Callable[[int], Iterator]:
    """A function of the first step giving the batches from there to ``adapt.steps``."""
    dataset = TileViews(data.train, views, seed, distributed.rank)
    workers = int(adapt["num_workers"])

    def from_step(start: int) -> Iterator:
        sampler = StepBatches(len(data.train), int(adapt["batch_size"]), seed, distributed.rank, start,
                              int(adapt["steps"]))
        return iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_views, num_workers=workers,
                               persistent_workers=False, pin_memory=torch.cuda.is_available()))

    return from_step


def validation_score(objective: FineTune, data: AdaptationData, views: ViewMaker, size: int,
                     device: torch.device, classes: list[str]) -> Callable[[], float]:
    """Finetune's early-stopping score: the tile head's balanced accuracy on the validation tiles."""
    images = centre_views(data.validation, views, size)  # type: ignore[arg-type]
    truth = [classes[i] for i in data.validation.labels]  # type: ignore[union-attr]

    def score() -> float:
        predicted = objective.predict(images.to(device)).cpu().tolist()
        return balanced_accuracy(truth, [classes[i] for i in predicted], labels=classes)

    return score


@dataclass
class TrainingSession:
    """Everything one adaptation run trains with (built by :func:`prepare_training`)."""

    data: AdaptationData
    views: ViewMaker
    objective: Objective
    peft_model: nn.Module | None
    trainable: int  # the encoder's trainable parameters at the start
    trainer: Trainer
    batches: Callable[[int], Iterator]


def prepare_training(cfg: Mapping, encoder: Encoder, folder: Path, signature: str, distributed: Distributed,
                     device: torch.device) -> TrainingSession:
    """The tiles, views, trainable encoder, objective and trainer of ``cfg``'s adaptation of ``encoder``
    (checkpoints in ``folder``); nothing trained yet."""
    adapt = dict(cfg["adapt"])
    data = adaptation_data(cfg)
    seed = int(cfg["seed"])
    seed_everything(seed)  # the same heads on every process
    views = ViewMaker.for_method(adapt, encoder.input_size, encoder.mean, encoder.std,
                                 fixed_size=is_vit(timm_module(encoder.model)))
    peft_model = make_trainable(encoder.model, adapt)
    trainable = trainable_parameters(peft_model if peft_model is not None else encoder.model)
    classes = list(cfg["data"]["classes"])
    objective = build_objective(adapt["method"], encoder.model, encoder.out_dim, adapt, len(classes),
                                views.globals).to(device)
    validate = None
    if isinstance(objective, FineTune) and data.validation is not None:
        validate = validation_score(objective, data, views, encoder.input_size, device, classes)
    trainer = Trainer(objective, adapt, device, folder, signature, distributed, validate)
    return TrainingSession(data, views, objective, peft_model, trainable, trainer,
                           step_batches(data, views, adapt, seed, distributed))


def _device(cfg: Mapping, distributed: Distributed) -> torch.device:
    device = resolve_device(cfg["runtime"]["device"])
    if distributed.world > 1 and device.type == "cuda":
        device = torch.device("cuda", distributed.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def run(cfg: Mapping) -> Path:
    """Adapt the encoder; returns its folder (``{processed}/encoders/{adapt.name}``)."""
    adapt = dict(cfg["adapt"])
    require_libraries(adapt)
    layout.require_writable(cfg, "processed")
    folder = layout.adapted_encoder_dir(cfg)
    features = cfg["features"]
    base_weights = starting_weights(cfg)
    distributed = distributed_from_environment()
    device = _device(cfg, distributed)
    encoder = create_encoder(features["encoder"], weights=base_weights, input_size=features["input_size"])
    signature = settings_signature(cfg, encoder.weights_id, encoder.input_size, distributed.world)
    record = read_record(folder)
    if record and record.get("signature") == signature and record.get("finished"):
        log.info("stage 02b: %s is already adapted with these settings (%d steps); nothing to do", folder,
                 record["steps_done"])
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if distributed.main:
        save_config(cfg, folder)
    session = prepare_training(cfg, encoder, folder, signature, distributed, device)
    data, objective, peft_model, trainer = session.data, session.objective, session.peft_model, session.trainer
    trainer.resume()
    started = time.time()
    state = trainer.run(session.batches)
    replicas_agree = trainer.replicas_agree()
    if distributed.active:
        torch.distributed.destroy_process_group()
    if not distributed.main:
        return folder
    if state.best_encoder is not None:  # finetune: the encoder of the best validation score
        objective.student.encoder.load_state_dict(state.best_encoder)
    plain = plain_timm_module(encoder.model, peft_model).cpu()
    weights = save_weights(plain, folder)
    verdict = learning_verdict(state.history)
    label_slides = data.train.slide_ids + (data.validation.slide_ids if data.validation else []) \
        if objective.uses_labels else []
    record = {
        "signature": signature, "finished": state.stopped_by in ("steps", "early_stopping"),
        "stopped_by": state.stopped_by, "steps": int(adapt["steps"]), "steps_done": state.step,
        "resumed_from_step": state.resumed_from, "method": adapt["method"], "trainable": adapt["trainable"],
        "trainable_parameters": session.trainable,  # the encoder's, at the start (finetune opens more as it goes)
        "base_encoder": features["encoder"], "base_weights": str(base_weights or "the encoder's offline default"),
        "base_weights_sha256": encoder.weights_id, "input_size": encoder.input_size,
        "weights_sha256": file_checksum(weights), "tiles": len(data.train), "slides": len(data.train.slide_ids),
        "label_slides": label_slides, "holdout_slides": data.holdout_slides,
        "validation_best": state.best_score, "validation_best_step": state.best_step,
        "seed": int(cfg["seed"]), "processes": distributed.world,
        "replicas_agree": replicas_agree, "device": str(device),
        "wall_time_s": round(state.elapsed_s, 2), "this_run_s": round(time.time() - started, 2),
        **verdict, "libraries": library_versions(), "adapt": adapt,
    }
    write_record(folder, record)
    write_curve(state.history, folder, f"{adapt['method']} ({adapt['trainable']}), {state.step} steps")
    if not verdict["learned"]:
        log.warning("stage 02b: the adapted encoder did NOT learn (%s); it is saved, but check it before use",
                    verdict["why"])
    log.info("stage 02b: %s after %d of %d steps (%s) -> %s; use it with features.weights=%s", adapt["method"],
             state.step, adapt["steps"], state.stopped_by, folder, weights)
    return folder


