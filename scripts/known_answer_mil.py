#!/usr/bin/env python
"""Train every registered MIL head with the package defaults on a known-answer problem and score it on
fresh bags.

The problem (``ubc_ocean.synthetic.witness_bags``): 5 classes, bags of 40-300 Gaussian instances in 32
dimensions, of which 3% (at least 2) are shifted by 5 units along their class's direction. Mean pooling
dilutes that signal by the bag size; attention and extreme-score pooling should find it. Each head trains
through ``ubc_ocean.mil.train.fit`` with the ``mil`` section of ``load_config(None)`` and its own
``default_training`` (as stage 04 does), on 20 bags per class, early-stopped on 8 per class, and is scored
on 20 fresh bags per class, once per seed.

The last line is machine-readable:
    RESULT <head>=<mean test balanced accuracy> ...
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ubc_ocean.config import load_config
from ubc_ocean.metrics import balanced_accuracy
from ubc_ocean.mil import available_models
from ubc_ocean.mil.predict import predict_bags
from ubc_ocean.mil.train import fit, model_training_config, training_record
from ubc_ocean.synthetic.witness_bags import WitnessProblem, witness_bags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(available_models()), help="comma-separated heads")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides applied before the heads' defaults, e.g. mil.epochs=12")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = WitnessProblem()
    train, valid, test = (witness_bags(problem, n, seed) for n, seed in ((20, 0), (8, 1), (20, 2)))
    cfg = load_config(None, args.set)
    device = torch.device("cpu")
    summary = {}
    print(f"{'head':10s} {'lr':>8s} {'epochs':>6s}  test balanced accuracy per seed   mean   s/fit")
    for name in args.models.split(","):
        mil_cfg = model_training_config(cfg["mil"], name)
        record = training_record(mil_cfg)
        scores, start = [], time.perf_counter()
        for seed in (int(s) for s in args.seeds.split(",")):
            result = fit(name, {}, train.bags, train.labels, valid.bags, valid.labels, problem.n_classes, mil_cfg,
                         seed=seed, device=device)
            predicted = predict_bags(result.model, test.bags, device).probs.argmax(1)
            scores.append(balanced_accuracy(test.labels, predicted.tolist()))
        summary[name] = float(np.mean(scores))
        per_fit = (time.perf_counter() - start) / len(scores)
        print(f"{name:10s} {record['lr']:8.0e} {record['epochs']:6d}  {' '.join(f'{s:.3f}' for s in scores):32s}"
              f" {summary[name]:.3f} {per_fit:6.1f}", flush=True)
    print("RESULT " + " ".join(f"{name}={score:.3f}" for name, score in summary.items()))


if __name__ == "__main__":
    main()
