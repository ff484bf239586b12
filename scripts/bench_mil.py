#!/usr/bin/env python
"""Benchmark the MIL heads: forward+backward time and peak memory against bag size, and a 5-fold CV.

1. TransMIL and ABMIL (default sizes) on bags of 1k, 4k, 16k and 64k instances of D=1280: one
   forward+backward each (after a warm-up), timed; peak memory is CUDA's max allocated on a GPU, else the
   growth of the process's peak RSS, measured in a fresh process per case. TransMIL's Nystrom attention
   should make t(16k)/t(1k) about linear (<= 20), not quadratic (256).
2. The wall time of stage 04's cross-validation loop (5 folds, one seed, ABMIL) on 538 synthetic bags of
   1000 x 1280 fp16 features with a learnable class signal, at the given epochs and instance cap.

The last line is machine-readable:
    RESULT transmil_t16k_over_t1k=<ratio> abmil_cv5_seconds=<seconds>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CASE = """
import json, resource, sys, time
import torch
from ubc_ocean.mil import create_mil_model
name, n, dim, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), torch.device(sys.argv[4])
torch.manual_seed(0)
model = create_mil_model(name, in_dim=dim, n_classes=5).to(device)
target = torch.tensor([1], device=device)

def step(bag):
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(bag)["logits"], target)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()

step(torch.randn(min(n, 512), dim, device=device))  # warm-up
bag = torch.randn(n, dim, device=device)
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
step(bag)
seconds = time.perf_counter() - start
if device.type == "cuda":
    peak_mb = torch.cuda.max_memory_allocated() / 2**20
else:
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))
"""


def bag_scaling(device: str, sizes: list[int], dim: int) -> dict[str, dict[int, dict]]:
    results: dict[str, dict[int, dict]] = {}
    for name in ("transmil", "abmil"):
        results[name] = {}
        for n in sizes:
            out = subprocess.run([sys.executable, "-c", CASE, name, str(n), str(dim), device],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            case = results[name][n] = json.loads(out)
            print(f"{name:9} N={n:6d}  {case['seconds']:8.3f} s  peak {case['peak_mb']:8.0f} MB", flush=True)
    return results


def cross_validation_seconds(n_bags: int, n_instances: int, dim: int, epochs: int, max_instances: int,
                             device: str) -> tuple[float, float]:
    """Stage 04's fold loop on synthetic fp16 bags; returns (seconds, OOF balanced accuracy)."""
    import numpy as np
    import pandas as pd
    import torch

    from ubc_ocean.config import load_config
    from ubc_ocean.device import resolve_device
    from ubc_ocean.folds import assign_folds
    from ubc_ocean.metrics import balanced_accuracy
    from ubc_ocean.mil.train import fit

    rng = np.random.default_rng(0)
    classes = ["CC", "EC", "HGSC", "LGSC", "MC"]
    labels = rng.choice(5, size=n_bags, p=[0.18, 0.23, 0.41, 0.09, 0.09])
    signal = rng.normal(size=(5, dim)).astype(np.float32)
    bags = []
    for label in labels:
        bag = rng.normal(size=(n_instances, dim)).astype(np.float32)
        bag[: n_instances // 10] += 0.5 * signal[label]  # a tenth of the tiles carry the class
        bags.append(torch.from_numpy(bag.astype(np.float16)))
    table = pd.DataFrame({"label": [classes[y] for y in labels], "is_tma": False})
    folds = assign_folds(table, 5, seed=0).to_numpy()
    cfg = load_config(None, [f"mil.epochs={epochs}", f"mil.max_instances={max_instances}"])
    start = time.perf_counter()
    predicted = np.zeros(n_bags, dtype=int)
    for fold in range(5):
        train, valid = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        result = fit("abmil", {}, [bags[i] for i in train], labels[train].tolist(), [bags[i] for i in valid],
                     labels[valid].tolist(), 5, cfg.mil, seed=fold, device=resolve_device(device))
        predicted[valid] = result.valid.probs.argmax(1)
        print(f"fold {fold}: best valid BA {result.best_score:.3f} at epoch {result.best_epoch}", flush=True)
    return time.perf_counter() - start, balanced_accuracy(labels.tolist(), predicted.tolist())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--sizes", default="1000,4000,16000,64000")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--bags", type=int, default=538)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-instances", type=int, default=256, help="mil.max_instances (training subsample)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    scaling = bag_scaling(args.device, sizes, args.dim)
    ratio = scaling["transmil"][sizes[2]]["seconds"] / scaling["transmil"][sizes[0]]["seconds"]
    print(f"TransMIL t({sizes[2]})/t({sizes[0]}) = {ratio:.2f} (linear would be {sizes[2] / sizes[0]:.0f})")
    seconds, accuracy = cross_validation_seconds(args.bags, args.instances, args.dim, args.epochs,
                                                 args.max_instances, args.device)
    print(f"ABMIL 5-fold CV: {seconds:.1f} s ({args.bags} bags of {args.instances} x {args.dim}, "
          f"{args.epochs} epochs, {args.max_instances} instances per step), OOF balanced accuracy {accuracy:.3f}")
    print(f"RESULT transmil_t16k_over_t1k={ratio:.3f} abmil_cv5_seconds={seconds:.1f}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
