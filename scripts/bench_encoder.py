#!/usr/bin/env python
"""Where an encoder's time goes on this machine's device: the model alone per precision and memory format,
stage 05's whole per-batch step (``embed_batches``: pinned copy, preprocessing, model, the copy back), and
the first call of a batch size not seen before (a slide's last batch has its own size), as it comes and
padded to a power of two (``embed_batches``' bucketing, on by default on CUDA). For the default encoder and
a ViT-B/16 with random weights (timing only).

    PYTHONPATH=src:scripts python scripts/bench_encoder.py [--batch-size 64] [--reps 10]

Ends with one line per encoder (on CPU it runs too, slowly, fp32 only)::

    RESULT encoder=<name> device=<device> step_ms=<per batch> model_ms=<model alone, as configured>
           new_shape_ms=<first call of a new size> bucketed_ms=<the same, padded>
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_inference import card_name, encoder_overrides

from ubc_ocean.config import load_config
from ubc_ocean.device import autocast, autocast_dtype, resolve_device
from ubc_ocean.features.embed import embed_batches, encoder_from_config, inference_options, prepare_encoder

NEW_SIZES = (17, 23, 29, 41, 53)
BUCKETED_SIZES = (19, 27, 37, 45, 57)  # padded (on CUDA) to 32, 32, 64, 64, 64


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Steady-state milliseconds per call (two warm-up calls first)."""
    fn(), fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return 1000 * (time.perf_counter() - started) / reps


def first_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return 1000 * (time.perf_counter() - started)


def bench(cfg, label: str, batch_size: int, reps: int) -> str:  # type: ignore[no-untyped-def]
    device = resolve_device(cfg["runtime"]["device"])
    encoder = prepare_encoder(encoder_from_config(cfg), device)
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (batch_size, 256, 256, 3), dtype=np.uint8)

    options = inference_options(cfg["features"])  # stage 05's: precision, TTA, the full batch size

    def step(batch: np.ndarray = tiles) -> np.ndarray:
        return next(embed_batches(encoder, [batch], device, **options))

    step_ms = per_call_ms(step, device, reps)
    with torch.inference_mode():
        x = encoder.preprocess(torch.as_tensor(tiles).to(device))
        precisions = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32"]
        formats = [torch.channels_last, torch.contiguous_format] if device.type == "cuda" else [torch.contiguous_format]
        model_ms = {}
        for memory_format in formats:
            encoder.model.to(memory_format=memory_format)
            view = x.contiguous(memory_format=memory_format)
            for precision in precisions:
                def forward(precision: str = precision, view: torch.Tensor = view) -> torch.Tensor:
                    with autocast(device, precision):
                        return encoder.model(view)
                key = f"{precision}/{'channels_last' if memory_format == torch.channels_last else 'contiguous'}"
                model_ms[key] = per_call_ms(forward, device, reps)
        prepare_encoder(encoder, device)  # back to the format stage 05 uses
    new_shape = {}  # bucketed first (its sizes pad to 32 and 64), then the raw sizes, each unseen before
    for bucket, sizes in ((True, BUCKETED_SIZES), (False, NEW_SIZES)):
        def sized(n: int, bucket: bool = bucket) -> np.ndarray:
            return next(embed_batches(encoder, [tiles[:n]], device, **{**options, "bucket": bucket}))
        firsts = [first_call_ms(lambda n=n: sized(n), device) for n in sizes]
        again = [first_call_ms(lambda n=n: sized(n), device) for n in sizes]
        new_shape[bucket] = (float(np.mean(firsts)), float(np.mean(again)))
    name = card_name(device)
    print(f"[{label}] on {name}, batch {batch_size}: stage-05 step {step_ms:.1f} ms "
          f"({step_ms / batch_size:.3f} ms/tile, precision {cfg['features']['precision']})")
    for key, ms in model_ms.items():
        print(f"[{label}]   model alone {key:<22} {ms:8.1f} ms/batch  {1000 * batch_size / ms:9.0f} tiles/s")
    for bucket, (first, again) in new_shape.items():
        sizes = BUCKETED_SIZES if bucket else NEW_SIZES
        print(f"[{label}]   batch sizes {sizes} {'padded to powers of two' if bucket else 'as they come'}: "
              f"first call {first:.1f} ms, same size again {again:.1f} ms (mean)")
    dtype = autocast_dtype(device, cfg["features"]["precision"])  # what stage 05 computes in
    configured = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    configured += "/channels_last" if device.type == "cuda" else "/contiguous"
    return (f"RESULT encoder={label} device={name} step_ms={step_ms:.1f} model_ms={model_ms[configured]:.1f} "
            f"new_shape_ms={new_shape[False][0]:.1f} bucketed_ms={new_shape[True][0]:.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--encoders", default="efficientnet_lite0,vit_b16_random")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_encoder-"))
    lines = []
    for name in args.encoders.split(","):
        cfg = load_config(None, [f"paths.data_root={work}", f"runtime.device={args.device}",
                                 f"features.batch_size={args.batch_size}", *encoder_overrides(name, work)])
        lines.append(bench(cfg, name, args.batch_size, args.reps))
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
