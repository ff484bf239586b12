#!/usr/bin/env python
"""Encoder adaptation (stage 02b) per method: does the data pipeline keep up, and does the encoder get better?

For each method it builds the stage's own training session (``prepare_training``) and times, on this machine's
device: (a) the real loop, tiles decoded and augmented on the fly by the DataLoader; (b) the same steps on those
batches held in memory; (c) the encoder's forward and backward alone on their first view. ``pipeline_ratio`` =
a / b: the data keep up when it is >= 0.8 (else raise ``adapt.num_workers``). Then it trains the method for
``--steps`` steps (the stage itself, into a temporary processed folder) and probes the tiles of held-out slides
(``adapt.label_holdout_folds``, which no labelled method sees) with a kNN vote of their slide's class, neighbours
of the same slide left out, before and after. On CUDA it also projects the wall time of 2000 DINO+LoRA steps at
batch 64 for ViT-S/16 and ViT-B/16 (random weights, timing only); without a GPU it says so.

    PYTHONPATH=src:scripts .venv/bin/python scripts/bench_adaptation.py --config configs/demo.yaml \\
        [--methods dino,moco,supcon,finetune] [--steps 60] [--timing-steps 8] [dotted overrides ...]

Ends with one line per method (and per ViT on CUDA)::

    RESULT method=<m> device=<d> steps_per_s=<a> pipeline_ratio=<a/b> encoder_share=<c/b time> knn_before=<..>
           knn_after=<..> knn_gain=<..> learned=<..> train_s=<..>
    RESULT projection encoder=<vit> device=<card> steps_per_s=<..> projected_2000_steps_min=<..>
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from bench_inference import card_name

from ubc_ocean import layout, tile_store
from ubc_ocean.adaptation.stage import prepare_training, run, settings_signature
from ubc_ocean.adaptation.trainer import Distributed
from ubc_ocean.config import Config, load_config
from ubc_ocean.device import autocast, resolve_device
from ubc_ocean.encoders.registry import create_encoder

METHOD_OVERRIDES = {"dino": [], "moco": [], "supcon": ["adapt.queue_size=256"],
                    "finetune": ["adapt.trainable=last_blocks", "adapt.head_steps=10", "adapt.unfreeze_every=10"]}
TILES_PER_SLIDE = 16


def own_processed(cfg: Mapping, folder: Path) -> Path:
    """A scratch processed folder holding the manifest and folds (the adapted encoders land there)."""
    processed = folder / "processed"
    processed.mkdir(parents=True, exist_ok=True)
    for path in (layout.manifest_path(cfg), layout.folds_path(cfg)):
        shutil.copy2(path, processed / path.name)
    return processed


def timed(function, repeats: int = 1) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(cfg: Config, steps: int, scratch: Path) -> dict:
    """Steps/s of the real loop, of the same steps on batches in memory, and of the encoder alone."""
    device = resolve_device(cfg["runtime"]["device"])
    features = cfg["features"]
    encoder = create_encoder(features["encoder"], weights=features["weights"], input_size=features["input_size"])
    signature = settings_signature(cfg, encoder.weights_id, encoder.input_size, 1)
    session = prepare_training(cfg, encoder, scratch, signature, Distributed(), device)
    trainer, adapt = session.trainer, session.trainer.adapt
    trainer.validate = None  # finetune's validation passes are not training steps
    adapt["checkpoint_every"] = 10**9
    adapt["steps"] = 1
    trainer.run(session.batches)  # warm-up: first allocations, lazy imports
    adapt["steps"] = 1 + steps
    loop_s = timed(lambda: trainer.run(session.batches))
    adapt["steps"] = trainer.state.step + steps
    held = list(session.batches(trainer.state.step))  # the next steps' batches, drawn before they are timed
    memory_s = timed(lambda: trainer.run(lambda start: iter(held)))
    model = encoder.model
    # the input asks for its gradient: the backward pass runs even where no encoder weight trains yet
    first_views = [views[0].to(device).requires_grad_() for views, _ in held]

    def encoder_alone() -> None:
        for x in first_views:
            with autocast(device, adapt["precision"]):
                out = model(x)
            out.float().sum().backward()

    encoder_s = timed(encoder_alone)
    return {"device": str(device), "steps_per_s": steps / loop_s, "memory_steps_per_s": steps / memory_s,
            "pipeline_ratio": memory_s / loop_s, "encoder_share": encoder_s / memory_s}


def held_out_tiles(cfg: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``TILES_PER_SLIDE`` tiles of every training slide of the held-out folds, their class and slide."""
    table = layout.read_training_table(cfg)
    held = table[(table["source"] == "train") & table["fold"].isin(cfg["adapt"]["label_holdout_folds"])]
    tiles, labels, slides = [], [], []
    for row in held.itertuples():
        folder = layout.slide_tiles_dir(cfg, row.source, row.image_id)
        if not tile_store.is_complete(folder):
            continue
        for name in tile_store.read_index(folder)["file"][:TILES_PER_SLIDE]:
            tiles.append(tile_store.read_tile(folder / name))
            labels.append(row.label)
            slides.append(row.slide_id)
    return np.stack(tiles), np.asarray(labels), np.asarray(slides)


def knn_accuracy(features: torch.Tensor, labels: np.ndarray, slides: np.ndarray, k: int = 5) -> float:
    """Tile-level accuracy of a cosine kNN vote of the slide's class, neighbours of the same slide left out."""
    z = torch.nn.functional.normalize(features.float(), dim=1)
    similarity = z @ z.T
    same_slide = torch.from_numpy(slides[:, None] == slides[None, :])
    similarity[same_slide] = -2.0
    neighbours = similarity.topk(k, dim=1).indices.numpy()
    names, codes = np.unique(labels, return_inverse=True)
    votes = codes[neighbours]
    predicted = np.array([np.bincount(row, minlength=len(names)).argmax() for row in votes])
    return float((predicted == codes).mean())


def embed(cfg: Mapping, weights: str | None, tiles: np.ndarray) -> torch.Tensor:
    features = cfg["features"]
    encoder = create_encoder(features["encoder"], weights=weights, input_size=features["input_size"])
    batch = torch.from_numpy(tiles)
    with torch.no_grad():
        return torch.cat([encoder.model(encoder.preprocess(chunk)) for chunk in batch.split(64)])


def probe(cfg: Config, tiles: np.ndarray, labels: np.ndarray, slides: np.ndarray) -> dict:
    """Train with the stage itself, then the kNN probe before and after."""
    start = time.perf_counter()
    folder = run(cfg)
    train_s = time.perf_counter() - start
    record = json.loads((folder / "record.json").read_text())
    before = knn_accuracy(embed(cfg, cfg["features"]["weights"], tiles), labels, slides)
    after = knn_accuracy(embed(cfg, str(folder / "model.safetensors"), tiles), labels, slides)
    return {"knn_before": before, "knn_after": after, "knn_gain": after - before, "learned": record["learned"],
            "why": record["why"], "train_s": train_s}


def gpu_projection(cfg_path: str, overrides: Iterable[str], scratch: Path) -> list[str]:
    """RESULT lines projecting 2000 DINO+LoRA steps at batch 64 for ViT-S/16 and ViT-B/16 (CUDA only)."""
    import timm
    from safetensors.torch import save_file

    lines = []
    for name in ("vit_small_patch16_224", "vit_base_patch16_224"):
        weights = scratch / f"{name}.safetensors"
        model = timm.create_model(name, num_classes=0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        processed = own_processed(load_config(cfg_path, overrides), scratch / name)
        cfg = load_config(cfg_path, [*overrides, f"features.encoder={name}", f"features.weights={weights}",
                                     "features.input_size=224", "adapt.method=dino", "adapt.trainable=lora",
                                     "adapt.batch_size=64", "adapt.num_workers=8", f"paths.processed={processed}"])
        measured = throughput(cfg, 20, scratch / name / "encoders")
        minutes = 2000 / measured["steps_per_s"] / 60
        lines.append(f"RESULT projection encoder={name} device={card_name(torch.device('cuda'))} "
                     f"steps_per_s={measured['steps_per_s']:.2f} pipeline_ratio={measured['pipeline_ratio']:.2f} "
                     f"projected_2000_steps_min={minutes:.1f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--methods", default="dino,moco,supcon,finetune")
    parser.add_argument("--steps", type=int, default=60, help="training steps per method for the kNN probe")
    parser.add_argument("--timing-steps", type=int, default=8, help="steps timed per way of feeding them")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = load_config(args.config, args.overrides)
    tiles, labels, slides = held_out_tiles(base)
    print(f"probe: {len(tiles)} tiles of {len(set(slides))} held-out slides ({len(set(labels))} classes)")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_adaptation-") as scratch_dir:
        scratch = Path(scratch_dir)
        for method in args.methods.split(","):
            overrides = [*args.overrides, f"adapt.method={method}", *METHOD_OVERRIDES[method],
                         f"adapt.steps={args.steps}", f"adapt.name=bench_{method}",
                         f"paths.processed={own_processed(base, scratch / method)}"]
            cfg = load_config(args.config, overrides)
            measured = throughput(cfg, args.timing_steps, scratch / method / "timing")
            probed = probe(cfg, tiles, labels, slides)
            print(f"{method}: {measured['steps_per_s']:.2f} steps/s with the DataLoader, "
                  f"{measured['memory_steps_per_s']:.2f} from memory (pipeline ratio {measured['pipeline_ratio']:.2f}"
                  f"{'' if measured['pipeline_ratio'] >= 0.8 else ': the data do NOT keep up, raise adapt.num_workers'}"
                  f"); the encoder's forward+backward is {measured['encoder_share']:.0%} of a step; kNN "
                  f"{probed['knn_before']:.3f} -> {probed['knn_after']:.3f} after {args.steps} steps "
                  f"({probed['train_s']:.0f} s; learned: {probed['learned']} {probed['why']})")
            results.append(f"RESULT method={method} device={measured['device']} "
                           f"steps_per_s={measured['steps_per_s']:.3f} pipeline_ratio={measured['pipeline_ratio']:.2f} "
                           f"encoder_share={measured['encoder_share']:.2f} knn_before={probed['knn_before']:.3f} "
                           f"knn_after={probed['knn_after']:.3f} knn_gain={probed['knn_gain']:+.3f} "
                           f"learned={probed['learned']} train_s={probed['train_s']:.1f}")
        if torch.cuda.is_available():
            results += gpu_projection(args.config, args.overrides, scratch / "projection")
        else:
            print("no GPU here: the projected wall time of 2000 steps for ViT-S/16 and ViT-B/16 was not measured")
    print("\n".join(results))


if __name__ == "__main__":
    main()
