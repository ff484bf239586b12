#!/usr/bin/env python
"""Check stage 05's time budget on the real clock: with a budget of half the full cost, stages 05 + 06 end
within the budget + 5% and the submission lists every test id exactly once.

It trains a small run on the synthetic demo data (stages 00-04: the demo config, shrunk, one ABMIL), then
swaps its test set for one of the real composition, scaled down (``bench_inference.make_test_set``: TMAs,
and a few larger WSIs with thumbnails). Then, on the machine's clock:

1. stages 05 + 06 with no budget: their wall time is ``full_s``;
2. the test embeddings removed, stages 05 + 06 again with ``inference.time_budget_minutes`` set to
   ``full_s / 2``: their wall time is ``spent_s``.

It ends with::

    RESULT full_s=... budget_s=... spent_s=... ratio=<spent / budget> ids_ok=<every id once> reduced=<images
           embedded at lower cost> skipped=<images left to the fallback> device=... load=<1-min load average>

``--quick`` shrinks everything for a smoke test (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
from bench_inference import make_test_set

from ubc_ocean import embedding_cache, layout
from ubc_ocean.config import Config, load_config
from ubc_ocean.device import resolve_device
from ubc_ocean.external.stage import run as merge
from ubc_ocean.features.stage import run as embed
from ubc_ocean.inference.stage import run as infer
from ubc_ocean.mil.stage import run as train
from ubc_ocean.sources import TEST, raw_path
from ubc_ocean.submit.stage import run as submit
from ubc_ocean.synthetic import generate
from ubc_ocean.tiling.stage import run as tile

REPO = Path(__file__).resolve().parents[1]
# The demo config, shrunk: a run to predict with, trained in a minute or two (its accuracy is beside the point).
SMALL_RUN = ["synthetic.wsi_per_class=2", "synthetic.tma_per_class=1", "synthetic.test_images=2",
             "synthetic.test_other=0", "synthetic.external_tiff_slides=1", "synthetic.external_patch_slides=1",
             "folds.n_splits=2", "mil.models=[abmil]", "mil.epochs=2", "mil.seeds=[0]"]


def run_config(work: Path, extra: list[str]) -> Config:
    """The shrunk demo config, writing everything under ``work``."""
    return load_config(REPO / "configs" / "demo.yaml",
                       [f"paths.data_root={work}", f"paths.submissions={work / 'submissions'}", *SMALL_RUN, *extra])


def small_run(cfg: Config) -> Config:
    """Train the run of ``cfg`` (stages 00-04 on the shrunk demo data)."""
    generate(cfg)
    tile(cfg)
    merge(cfg)
    embed(cfg)
    train(cfg)
    return cfg


def swap_test_set(cfg: Config, tmas: int, tma_side: int, wsis: int, wsi_mpx: float, base_side: int) -> list[str]:
    """Replace the run's test images, thumbnails and ``test.csv`` by a set of the real composition; its ids."""
    images, thumbnails = raw_path(cfg, "test_images"), raw_path(cfg, "test_thumbnails")
    for folder in (images, thumbnails):
        shutil.rmtree(folder, ignore_errors=True)
    thumbnails.mkdir(parents=True)
    specs = make_test_set(images, tmas, tma_side, wsis, wsi_mpx, base_side)
    for spec in specs:
        if spec.thumbnail is not None:
            spec.thumbnail.rename(thumbnails / f"{spec.image_id}_thumbnail.png")
    rows = [{"image_id": s.image_id, "image_width": s.expected_size[0], "image_height": s.expected_size[1]}
            for s in specs]
    pd.DataFrame(rows).to_csv(raw_path(cfg, "test_csv"), index=False)
    return [s.image_id for s in specs]


def stages_05_06(cfg: Config) -> float:
    """Wall seconds of stage 05 then stage 06 from no test embeddings (any earlier ones are removed)."""
    shutil.rmtree(layout.embeddings_root(cfg) / TEST, ignore_errors=True)
    started = time.monotonic()
    infer(cfg)
    submit(cfg)
    return time.monotonic() - started


def outcome(cfg: Config, ids: list[str]) -> tuple[bool, int, int]:
    """(every test id in the submission exactly once, images embedded at lower cost, images not embedded)."""
    submission = pd.read_csv(layout.submission_path(cfg), dtype={"image_id": str})
    ids_ok = Counter(submission.image_id) == Counter(ids)
    modes = [embedding_cache.read_attrs(path).get("inference_mode", "full")
             for path in (layout.embeddings_root(cfg) / TEST).glob("*.h5") if embedding_cache.is_complete(path)]
    return ids_ok, sum(mode != "full" for mode in modes), len(ids) - len(modes)


def add_test_set_options(parser: argparse.ArgumentParser) -> None:
    """The options of the test set and the run (this script's and ``bench_bundle_budget``'s)."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, figures meaningless")
    parser.add_argument("--tmas", type=int, default=24)
    parser.add_argument("--tma-side", type=int, default=1100, help="px (the demo's TMA scale: slides.tma_max_side)")
    parser.add_argument("--wsis", type=int, default=6)
    parser.add_argument("--wsi-mpx", type=float, default=120.0)
    parser.add_argument("--max-tiles", type=int, default=400, help="tiling.max_tiles_per_slide (the demo's: 48): "
                        "the WSIs' encoding then outweighs stage 05's start-up, as on the real set")
    parser.add_argument("--work", type=Path, default=None, help="folder to work in (default: a new temporary one)")


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides the options give; ``--quick`` also shrinks the test set in ``args``."""
    extra = [f"tiling.max_tiles_per_slide={args.max_tiles}"]
    if args.quick:
        args.tmas, args.tma_side, args.wsis, args.wsi_mpx = 2, 600, 1, 2.0
        # one WSI per class, and stages 00, 01 and 03 in this process: at this size worker processes would only add
        # their start-up (stage 05's decoders are inference.decoders, still --workers in bench_budget)
        extra += ["synthetic.wsi_width=[700,900]", "synthetic.wsi_height=[500,640]", "synthetic.tma_sides=[480,520]",
                  "synthetic.wsi_per_class=1", "synthetic.workers=1", "runtime.workers=1",
                  "tiling.tile_size=64", "features.input_size=64", "tiling.max_tiles_per_slide=24", "mil.epochs=1"]
    return extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_test_set_options(parser)
    parser.add_argument("--workers", type=int, default=2, help="decoder processes (inference.decoders, and "
                        "runtime.workers: the CPU encoder's threads are shared among them)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = [f"runtime.workers={args.workers}", f"inference.decoders={args.workers}", *run_overrides(args)]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_budget-"))
    cfg = small_run(run_config(work, extra))
    ids = swap_test_set(cfg, args.tmas, args.tma_side, args.wsis, args.wsi_mpx, base_side=768 if args.quick else 2048)
    full_s = stages_05_06(cfg)
    budget_s = full_s / 2
    budgeted = run_config(work, [*extra, f"inference.time_budget_minutes={budget_s / 60:.6f}"])
    spent_s = stages_05_06(budgeted)
    ids_ok, reduced, skipped = outcome(budgeted, ids)
    device = resolve_device(cfg.runtime.device)
    print(f"work folder: {work}; {len(ids)} test images; decoder processes {args.workers} on {os.cpu_count()} cores")
    print(f"RESULT full_s={full_s:.1f} budget_s={budget_s:.1f} spent_s={spent_s:.1f} ratio={spent_s / budget_s:.3f} "
          f"ids_ok={ids_ok} reduced={reduced} skipped={skipped} device={device} load={os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
