#!/usr/bin/env python
"""Check the Kaggle runner's time budget on the real clock: a bundle of two experiments, with a budget of
half their full cost, ends (both stages 05, then stage 06) within the budget + 5%, and the submission
lists every test id exactly once.

It trains two small runs on the synthetic demo data (``bench_budget``'s shrunk demo config: experiment
``a`` at the demo's encoder input size, ``b`` at 96 px, one ABMIL each), gives them a test set of the real
composition, scaled down (``bench_inference.make_test_set``), packages both as one bundle
(:func:`ubc_ocean.kaggle.bundle.build_bundle`, with only this package's wheel), then runs the bundle as the
notebook does (:func:`ubc_ocean.kaggle.runner.run_bundle`: each stage in its own process) on the machine's
clock:

1. with no budget: the wall time is ``full_s``;
2. in a new working folder (no test embeddings), with ``inference.time_budget_minutes`` at ``full_s / 2``:
   the wall time is ``spent_s``; the runner shares the budget between the experiments.

It ends with::

    RESULT full_s=... budget_s=... spent_s=... ratio=<spent / budget> ids_ok=<every id once> ran=<experiments
           whose stage 05 ran> reduced=<test embeddings made at lower cost> device=... load=<1-min load average>

Each stage's process start-up (importing torch, loading the models) is part of both walls, and of the
budget, but not of stage 05's per-image rates. ``--quick`` shrinks everything for a smoke test (its figures
mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
from bench_budget import SMALL_RUN, add_test_set_options, run_config, run_overrides, small_run, swap_test_set
from packaging.utils import canonicalize_name

from ubc_ocean import embedding_cache
from ubc_ocean.config import Config
from ubc_ocean.device import resolve_device
from ubc_ocean.features.stage import run as embed
from ubc_ocean.kaggle import wheels
from ubc_ocean.kaggle.bundle import build_bundle
from ubc_ocean.kaggle.runner import BUDGET_KEY, run_bundle
from ubc_ocean.mil.stage import run as train

EXPERIMENTS = {"a": [], "b": ["features.input_size=96"]}


def make_bundle(cfg: Config, work: Path) -> Path:
    """The bundle of experiments a and b: the image is this venv less this package, so the only wheel is
    this package's, built from the source tree."""
    image = work / "image-requirements.txt"
    installed = {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    image.write_text("\n".join(sorted(installed - {"ubc-ocean"})) + "\n")
    (work / "no-index").mkdir(exist_ok=True)
    target = wheels.Target(f"{sys.version_info.major}.{sys.version_info.minor}", wheels.DEFAULT_PLATFORM)
    out = work / "bundle"
    build_bundle(cfg, out, list(EXPERIMENTS), target, image, wheels_from=work / "no-index")
    return out


def run_once(bundle: Path, raw: Path, working: Path, budget_minutes: float | None) -> tuple[float, list[str]]:
    """Wall seconds of the whole bundle run, and the experiments whose stage 05 ran (those with test
    predictions in ``working``)."""
    working.mkdir(parents=True)  # as the notebook makes it
    started = time.monotonic()
    run_bundle(bundle, raw, working, [f"{BUDGET_KEY}={'null' if budget_minutes is None else budget_minutes}"],
               echo=lambda line: print(line, flush=True), keep_going=False)
    wall = time.monotonic() - started
    return wall, [name for name in EXPERIMENTS
                  if any((working / "predictions" / name).glob("*/test_predictions.csv"))]


def outcome(working: Path, ids: list[str]) -> tuple[bool, int]:
    """(every test id in the submission exactly once, test embeddings made at lower cost)."""
    submission = pd.read_csv(working / "submission.csv", dtype={"image_id": str})
    modes = [embedding_cache.read_attrs(path).get("inference_mode", "full") for path in working.rglob("test/*.h5")
             if embedding_cache.is_complete(path)]
    return Counter(submission.image_id) == Counter(ids), sum(mode != "full" for mode in modes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_test_set_options(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = run_overrides(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_bundle_budget-"))
    first, *others = EXPERIMENTS
    cfg = small_run(run_config(work, [*extra, f"experiment={first}", *EXPERIMENTS[first]]))
    ids = swap_test_set(cfg, args.tmas, args.tma_side, args.wsis, args.wsi_mpx, base_side=768 if args.quick else 2048)
    for name in others:
        other = run_config(work, [*extra, f"experiment={name}", *EXPERIMENTS[name]])
        embed(other)
        train(other)
    bundle = make_bundle(cfg, work)
    raw = Path(cfg.paths.raw)
    full_s, _ = run_once(bundle, raw, work / "working-full", None)
    budget_s = full_s / 2
    spent_s, ran = run_once(bundle, raw, work / "working-budget", budget_s / 60)
    ids_ok, reduced = outcome(work / "working-budget", ids)
    print(f"work folder: {work}; {len(ids)} test images; experiments {', '.join(EXPERIMENTS)}; "
          f"{os.cpu_count()} cores; the shrunk demo run: {' '.join(SMALL_RUN)}")
    print(f"RESULT full_s={full_s:.1f} budget_s={budget_s:.1f} spent_s={spent_s:.1f} ratio={spent_s / budget_s:.3f} "
          f"ids_ok={ids_ok} ran={','.join(ran)} reduced={reduced} device={resolve_device(cfg.runtime.device)} "
          f"load={os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
