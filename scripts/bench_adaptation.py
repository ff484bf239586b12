#!/usr/bin/env python
"""Encoder adaptation (stage 02b) per method: does the data pipeline keep up, and does the encoder get better?

For each method it builds the stage's own training session (``prepare_training``: the tiles, views, trainable
encoder, objective, trainer and step batches of ``stage.run``) and times, on this machine's device:

(a) the real loop, tiles decoded and augmented on the fly by the DataLoader (``adapt.num_workers`` workers);
(b) the same objective step (forward, backward, optimiser) on batches of that draw held in memory;
(c) the encoder's forward and backward alone on those batches' first view.

Each rate is the steady one: a separate warm-up run first, then the later half of ``--timing-steps`` steps
(DataLoader workers' start and their first buffered wave are left out; no checkpoint is written). finetune is
timed with ``adapt.head_steps=0`` (the phase that trains the encoder, not the head alone).
``pipeline_ratio`` = a / b: the data keep up when it is >= 0.8; below that, raise ``adapt.num_workers`` (the
remedy; 0 decodes in the training process). ``encoder_share`` = c's time over b's: the share of a step the
encoder's own forward+backward takes (the rest: heads, teacher, loss, optimiser; it can exceed 1 only by noise).

Then it trains the method for ``--steps`` steps with the stage itself (``stage.run``, into a temporary
``paths.processed`` holding copies of the manifest and folds) and probes tiles of held-out slides (those of
``adapt.label_holdout_folds``, which no labelled method sees; up to 16 tiles per slide) with a cosine kNN
(k=5) vote of their slide's class, neighbours of the same slide left out, with the starting and the adapted
weights. On CUDA it also projects the wall time of 2000 DINO steps at batch 64 for ViT-S/16 and ViT-B/16
(random weights, ``adapt.trainable`` and ``adapt.precision`` as configured; the training loop only, from its
steady rate over the later half of ``--projection-steps`` steps); without a GPU it says so.

    PYTHONPATH=src:scripts .venv/bin/python scripts/bench_adaptation.py --config configs/demo.yaml \\
        [--methods dino,moco,supcon,finetune] [--steps 60] [--timing-steps 10] [--projection-steps 40] \\
        [dotted overrides ...]

Ends with one line per method (``wall_s``: the stage's training run, saving included) and, on CUDA, one per ViT::

    RESULT method=<m> device=<d> steps_per_s=<a> pipeline_ratio=<a/b> encoder_share=<c/b time> knn_before=<..>
           knn_after=<..> knn_gain=<..> learned=<..> wall_s=<..>
    RESULT projection encoder=<vit> device=<card> trainable=<..> precision=<..> steps_per_s=<..>
           pipeline_ratio=<..> projected_2000_steps_min=<..>
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from bench_inference import card_name

from ubc_ocean import layout, tile_store
from ubc_ocean.adaptation.output import read_record
from ubc_ocean.adaptation.probe import knn_accuracy
from ubc_ocean.adaptation.stage import prepare_training, run, settings_signature, starting_weights
from ubc_ocean.adaptation.trainer import Distributed, Trainer
from ubc_ocean.config import Config, load_config
from ubc_ocean.device import autocast, autocast_dtype, resolve_device
from ubc_ocean.encoders.registry import create_encoder

# what each method trains with here (finetune opens its last blocks soon enough to move the encoder in a short run)
METHOD_OVERRIDES = {"dino": [], "moco": [], "supcon": ["adapt.queue_size=256"],
                    "finetune": ["adapt.trainable=last_blocks", "adapt.head_steps=10", "adapt.unfreeze_every=10"]}
TIMING_OVERRIDES = {"finetune": ["adapt.head_steps=0"]}  # time the steps that train the encoder
TILES_PER_SLIDE = 16
NEIGHBOURS = 5
HELD_BATCHES = 8  # distinct batches the in-memory run cycles through
KEEPS_UP = 0.8
PROJECTED_STEPS = 2000
VITS = ("vit_small_patch16_224", "vit_base_patch16_224")

Batches = Callable[[int], Iterator]


def own_processed(cfg: Mapping, folder: Path) -> Path:
    """A scratch processed folder holding the manifest and folds (the adapted encoders land there)."""
    processed = folder / "processed"
    processed.mkdir(parents=True, exist_ok=True)
    for path in (layout.manifest_path(cfg), layout.folds_path(cfg)):
        shutil.copy2(path, processed / path.name)
    return processed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_rate(trainer: Trainer, batches: Batches, steps: int) -> tuple[float, float]:
    """Run ``steps`` more steps of ``trainer`` on ``batches``; their steps/s over the later half (after the
    DataLoader's start and first buffered wave) and the seconds until the first batch was in hand."""
    marks: list[float] = []

    def clocked(start: int) -> Iterator:
        for item in batches(start):
            marks.append(time.perf_counter())  # step k's batch in hand: step k - 1 is done
            yield item
        _synchronize(trainer.device)
        marks.append(time.perf_counter())

    trainer.adapt["steps"] = trainer.state.step + steps
    began = time.perf_counter()
    trainer.run(clocked)
    half = steps // 2
    return (steps - half) / (marks[steps] - marks[half]), marks[0] - began


def throughput(cfg: Config, steps: int, folder: Path) -> dict:
    """Steady steps/s of the real loop, of the same steps on batches in memory, and of the encoder alone."""
    device = resolve_device(cfg["runtime"]["device"])
    features = cfg["features"]
    encoder = create_encoder(features["encoder"], weights=starting_weights(cfg), input_size=features["input_size"])
    signature = settings_signature(cfg, encoder.weights_id, encoder.input_size, 1)
    session = prepare_training(cfg, encoder, folder, signature, Distributed(), device)
    trainer, adapt = session.trainer, session.trainer.adapt
    trainer.validate = None  # finetune's validation passes are not training steps
    trainer.checkpoints = False  # nothing kept: no checkpoint writes in the timed steps
    adapt["steps"] = 2
    trainer.run(session.batches)  # warm-up: first allocations, lazy imports, kernel choices
    loop_rate, first_batch_s = steady_rate(trainer, session.batches, steps)
    adapt["steps"] = trainer.state.step + HELD_BATCHES  # the next steps' batches, drawn before they are timed
    held = list(session.batches(trainer.state.step))
    if device.type == "cuda":  # as the DataLoader hands them over (pin_memory)
        held = [([v.pin_memory() for v in views], labels.pin_memory()) for views, labels in held]
    memory_rate, _ = steady_rate(trainer, lambda start: (held[i % len(held)] for i in range(steps)), steps)

    model = encoder.model  # the session's: LoRA (or the opened blocks) in place, in training mode
    frozen = not any(p.requires_grad for p in model.parameters())
    # a frozen encoder: the input asks for its gradient, so the backward pass still runs through it
    first_views = [views[0].to(device).requires_grad_(frozen) for views, _ in held]

    def encoder_step(x: torch.Tensor) -> None:
        with autocast(device, adapt["precision"]):
            out = model(x)
        out.float().sum().backward()

    encoder_step(first_views[0])
    _synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        encoder_step(first_views[i % len(first_views)])
    _synchronize(device)
    encoder_rate = steps / (time.perf_counter() - start)
    return {"device": card_name(device), "steps_per_s": loop_rate, "memory_steps_per_s": memory_rate,
            "pipeline_ratio": loop_rate / memory_rate, "encoder_share": memory_rate / encoder_rate,
            "first_batch_s": first_batch_s, "trainable": session.trainable}


def held_out_tiles(cfg: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``TILES_PER_SLIDE`` tiles (a seeded draw) of every training slide of ``adapt.label_holdout_folds``,
    with their slide's class and slide."""
    table = layout.read_training_table(cfg)
    held = table[(table["source"] == "train") & table["fold"].isin(cfg["adapt"]["label_holdout_folds"])]
    tiles, labels, slides = [], [], []
    for row in held.itertuples():
        folder = layout.slide_tiles_dir(cfg, row.source, row.image_id)
        for _, path in tile_store.sample_tiles({row.slide_id: folder}, TILES_PER_SLIDE, int(cfg["seed"])):
            tiles.append(tile_store.read_tile(path))
            labels.append(str(row.label))
            slides.append(str(row.slide_id))
    if not tiles:
        raise SystemExit("no tiles of the held-out folds' slides: run stages 01-02 first")
    return np.stack(tiles), np.asarray(labels), np.asarray(slides)


def embed(cfg: Mapping, weights: str | None, tiles: np.ndarray) -> torch.Tensor:
    """The features of ``tiles`` (uint8 [N, H, W, 3]) from the configured encoder with ``weights``."""
    features = cfg["features"]
    encoder = create_encoder(features["encoder"], weights=weights, input_size=features["input_size"])
    device = resolve_device(cfg["runtime"]["device"])
    model = encoder.model.to(device)
    with torch.no_grad():
        return torch.cat([model(encoder.preprocess(chunk.to(device))).float().cpu()
                          for chunk in torch.from_numpy(tiles).split(64)])


def probe(cfg: Config, tiles: np.ndarray, labels: np.ndarray, slides: np.ndarray) -> dict:
    """Train with the stage itself, then the kNN probe with the starting and the adapted weights."""
    before = knn_accuracy(embed(cfg, starting_weights(cfg), tiles), labels, slides, NEIGHBOURS)
    start = time.perf_counter()
    folder = run(cfg)
    wall_s = time.perf_counter() - start
    record = read_record(folder) or {}
    after = knn_accuracy(embed(cfg, str(layout.adapted_weights_path(cfg)), tiles), labels, slides, NEIGHBOURS)
    return {"knn_before": before, "knn_after": after, "knn_gain": after - before, "learned": record["learned"],
            "why": record["why"], "wall_s": wall_s, "loop_s": record["wall_time_s"],
            "steps_done": record["steps_done"]}


def gpu_projection(cfg_path: str, overrides: Sequence[str], base: Mapping, scratch: Path, steps: int,
                   names: Sequence[str] = VITS, batch_size: int = 64) -> list[str]:
    """RESULT lines projecting ``PROJECTED_STEPS`` DINO steps at ``batch_size`` for each ViT of ``names``
    (random weights written to a safetensors file)."""
    import timm
    from safetensors.torch import save_file

    lines = []
    for name in names:
        folder = scratch / name
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / f"{name}.safetensors"
        model = timm.create_model(name, pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        del model
        cfg = load_config(cfg_path, [*overrides, f"features.encoder={name}", f"features.weights={weights}",
                                     "features.input_size=224", "adapt.base_weights=null", "adapt.method=dino",
                                     f"adapt.batch_size={batch_size}",
                                     f"paths.processed={own_processed(base, folder)}"])
        measured = throughput(cfg, steps, folder / "encoders")
        device = resolve_device(cfg["runtime"]["device"])
        precision = str(autocast_dtype(device, cfg["adapt"]["precision"]) or "fp32").replace("torch.", "")
        minutes = PROJECTED_STEPS / measured["steps_per_s"] / 60
        print(f"{name}: dino ({cfg['adapt']['trainable']}, {measured['trainable']:,} trainable) at batch "
              f"{batch_size}: {measured['steps_per_s']:.2f} steps/s with the DataLoader "
              f"({cfg['adapt']['num_workers']} workers, pipeline ratio {measured['pipeline_ratio']:.2f}), "
              f"{measured['memory_steps_per_s']:.2f} from memory: {PROJECTED_STEPS} steps in {minutes:.1f} min "
              f"on {measured['device']}", flush=True)
        lines.append(f"RESULT projection encoder={name} device={measured['device']} "
                     f"trainable={cfg['adapt']['trainable']} precision={precision} "
                     f"steps_per_s={measured['steps_per_s']:.3f} pipeline_ratio={measured['pipeline_ratio']:.2f} "
                     f"projected_{PROJECTED_STEPS}_steps_min={minutes:.1f}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--methods", default="dino,moco,supcon,finetune")
    parser.add_argument("--steps", type=int, default=60, help="training steps per method for the kNN probe")
    parser.add_argument("--timing-steps", type=int, default=10,
                        help="steps timed per way of feeding them (the later half counts)")
    parser.add_argument("--projection-steps", type=int, default=40,
                        help="CUDA: steps timed per ViT (the later half counts)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. adapt.batch_size=32")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHOD_OVERRIDES))
    if unknown:
        parser.error(f"unknown methods {unknown} (dino, moco, supcon, finetune)")
    if args.timing_steps < 2 or args.projection_steps < 2:
        parser.error("--timing-steps and --projection-steps must be >= 2")
    base = load_config(args.config, args.overrides)
    tiles, labels, slides = held_out_tiles(base)
    print(f"probe: {len(tiles)} tiles of {len(set(slides))} held-out slides (folds "
          f"{list(base['adapt']['label_holdout_folds'])}, {len(set(labels))} classes), {NEIGHBOURS}-NN, cosine, "
          "other slides only", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_adaptation-") as scratch_dir:
        scratch = Path(scratch_dir)
        for method in methods:
            overrides = [*args.overrides, f"adapt.method={method}", *METHOD_OVERRIDES[method],
                         f"adapt.steps={args.steps}", f"adapt.name=bench_{method}",
                         f"paths.processed={own_processed(base, scratch / method)}"]
            cfg = load_config(args.config, overrides)
            timing = load_config(args.config, [*overrides, *TIMING_OVERRIDES.get(method, [])])
            measured = throughput(timing, args.timing_steps, scratch / method / "timing")
            probed = probe(cfg, tiles, labels, slides)
            ratio = measured["pipeline_ratio"]
            verdict = (f"the data keep up (>= {KEEPS_UP})" if ratio >= KEEPS_UP else
                       f"the data do NOT keep up (< {KEEPS_UP}): raise adapt.num_workers "
                       f"(now {cfg['adapt']['num_workers']})")
            print(f"{method}: {measured['steps_per_s']:.2f} steps/s with the DataLoader, "
                  f"{measured['memory_steps_per_s']:.2f} from memory (pipeline ratio {ratio:.2f}: {verdict}); "
                  f"the encoder's forward+backward is {measured['encoder_share']:.0%} of a step", flush=True)
            print(f"{method}: kNN {probed['knn_before']:.3f} -> {probed['knn_after']:.3f} "
                  f"({probed['knn_gain']:+.3f}) after {probed['steps_done']} steps at batch "
                  f"{cfg['adapt']['batch_size']}; stage 02b took {probed['wall_s']:.1f} s (its loop "
                  f"{probed['loop_s']:.1f} s); learned: {probed['learned']}"
                  f"{' (' + probed['why'] + ')' if probed['why'] else ''}", flush=True)
            results.append(f"RESULT method={method} device={measured['device']} "
                           f"steps_per_s={measured['steps_per_s']:.3f} pipeline_ratio={ratio:.2f} "
                           f"encoder_share={measured['encoder_share']:.2f} knn_before={probed['knn_before']:.3f} "
                           f"knn_after={probed['knn_after']:.3f} knn_gain={probed['knn_gain']:+.3f} "
                           f"learned={probed['learned']} wall_s={probed['wall_s']:.1f}")
        if torch.cuda.is_available():
            results += gpu_projection(args.config, args.overrides, base, scratch / "projection",
                                      args.projection_steps)
        else:
            print(f"no GPU available: the projected wall time of {PROJECTED_STEPS} DINO steps at batch 64 for "
                  f"ViT-S/16 and ViT-B/16 was not measured")
    print("\n".join(results))


if __name__ == "__main__":
    main()
