#!/usr/bin/env python
"""Measure the memory of stage 05's decoder processes while they decode a small synthetic test set.

Runs :class:`~ubc_ocean.inference.pipeline.FusedPipeline` on the CPU with ``--decoders`` decoder processes
over ``--images`` synthetic TMAs (``--side`` px PNGs) and samples every decoder process (the children of the
fork server, or spawned children) from ``/proc`` while it lives: its peak RSS (``VmHWM``), its private memory
(USS: ``Private_Clean + Private_Dirty`` of ``smaps_rollup``, the pages no other process shares), its PSS,
and whether it has torch's library mapped. Linux only. The last line::

    RESULT decoder_peak_rss_mb=<largest VmHWM> decoder_uss_mb=<largest USS> decoder_pss_mb=<largest PSS>
           decoder_torch=<yes|no> decoders=<processes sampled> images=<decoded>   (all on one line)

Run it against another checkout with ``PYTHONPATH=<checkout>/src`` (it finds the pipeline where older
versions kept it) to compare before and after.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyvips

from ubc_ocean.config import load_config
from ubc_ocean.sources import SlideSpec


def make_tmas(folder: Path, count: int, side: int) -> list[SlideSpec]:
    """``count`` TMA-like PNGs: a stained disc of texture on white."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (0.42 * side) ** 2
    specs = []
    for i in range(count):
        texture = rng.normal(0, 25, (side, side, 1)) + np.array([200, 120, 180])
        rgb = np.where(disc[..., None], texture, 250).clip(0, 255).astype(np.uint8)
        path = folder / f"tma{i}.png"
        pyvips.Image.new_from_array(rgb).pngsave(str(path), compression=1)
        specs.append(SlideSpec("test", f"tma{i}", path, None, True, expected_size=(side, side),
                               competition_scale=True))
    return specs


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:  # the process ended meanwhile
        return ""


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in _read(f"{task}/children").split()]
    return found


def decoder_pids(main: int) -> list[int]:
    """The decoder processes of this run: children of a fork-server child of ``main``, or ``main``'s spawned
    children (neither the fork server nor the resource tracker)."""
    pids = []
    for child in _children(main):
        command = _read(f"/proc/{child}/cmdline").replace("\0", " ")
        if "forkserver" in command:
            pids += _children(child)
        elif "spawn_main" in command:
            pids.append(child)
    return pids


def sample(pid: int) -> dict | None:
    """Peak RSS, USS and PSS (MB) of ``pid`` and whether libtorch is mapped; None once it has ended."""
    status, rollup, maps = _read(f"/proc/{pid}/status"), _read(f"/proc/{pid}/smaps_rollup"), _read(f"/proc/{pid}/maps")
    if not status or not rollup:
        return None

    def kb(text: str, key: str) -> float:
        line = next((line for line in text.splitlines() if line.startswith(key + ":")), f"{key}: 0 kB")
        return float(line.split()[1])

    return {"peak_rss": kb(status, "VmHWM") / 1024,
            "uss": (kb(rollup, "Private_Clean") + kb(rollup, "Private_Dirty")) / 1024,
            "pss": kb(rollup, "Pss") / 1024, "torch": "libtorch" in maps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoders", type=int, default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--side", type=int, default=2000, help="TMA side in px (default 2000)")
    args = parser.parse_args()
    # Imported here, not at the top: a fork server imports the main script (as __mp_main__) before it forks
    # any decoder, so this script's own imports would be in every decoder, as stage 05's script's are.
    try:  # where the pipeline lives now, and where it lived before
        from ubc_ocean.inference.decoding import SlideJob
        from ubc_ocean.inference.pipeline import FusedPipeline
    except ImportError:
        from ubc_ocean.features.fused import SlideJob  # type: ignore[no-redef]
        from ubc_ocean.features.pipeline import FusedPipeline  # type: ignore[no-redef]

    work = Path(tempfile.mkdtemp(prefix="bench_decoder_memory-"))
    specs = make_tmas(work, args.images, args.side)
    cfg = load_config(None, [f"paths.data_root={work}", "runtime.device=cpu", "features.input_size=64",
                             "features.batch_size=32", "tiling.max_tiles_per_slide=64"])
    pipeline = FusedPipeline(cfg, workers=args.decoders)
    seen: dict[int, dict] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for pid in decoder_pids(os.getpid()):
                now = sample(pid)
                if now is not None:
                    best = seen.setdefault(pid, now)
                    seen[pid] = {key: max(best[key], now[key]) for key in now}
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    jobs = iter(SlideJob(spec) for spec in specs)
    results = list(pipeline.run(lambda: next(jobs, None)))
    done.set()
    watcher.join()
    failed = [r.message for r in results if r.status != "done"]
    if failed or not seen:
        raise SystemExit(f"no decoder sampled or images failed: {failed}")
    for pid, row in sorted(seen.items()):
        print(f"decoder {pid}: peak RSS {row['peak_rss']:.0f} MB, USS {row['uss']:.0f} MB, PSS {row['pss']:.0f} MB, "
              f"torch {'mapped' if row['torch'] else 'absent'}")
    print(f"RESULT decoder_peak_rss_mb={max(r['peak_rss'] for r in seen.values()):.0f} "
          f"decoder_uss_mb={max(r['uss'] for r in seen.values()):.0f} "
          f"decoder_pss_mb={max(r['pss'] for r in seen.values()):.0f} "
          f"decoder_torch={'yes' if any(r['torch'] for r in seen.values()) else 'no'} decoders={len(seen)} "
          f"images={len(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
