"""What the bundle's notebook runs once the wheels are installed: stage 05 for each bundled experiment (with
that experiment's config: its encoder and tiling), then stage 06 over all of them.

Each stage runs in its own Python process through the stages' front door (``ubc_ocean.cli.main``), as the
numbered scripts do: a config error is one line and exit status 2, and the memory of one experiment's
encoder is returned before the next. Paths come from where the notebook found things: ``paths.raw`` the
competition data, ``paths.runs`` the bundle's ``runs/`` (read-only), ``paths.data_root`` the working folder
under which every output goes, ``features.weights`` a weights file inside the bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

MANIFEST = "MANIFEST.json"
STAGE_05 = "ubc_ocean.inference.stage:run"
STAGE_06 = "ubc_ocean.submit.stage:run"
_LAUNCH = ("import sys; from ubc_ocean.cli import main; "
           "raise SystemExit(main(sys.argv[1], 'stage ' + sys.argv[1], sys.argv[2:]))")


class StageFailed(RuntimeError):
    """A stage process ended with a non-zero exit status."""


def read_manifest(bundle: str | Path) -> dict:
    return json.loads((Path(bundle) / MANIFEST).read_text())


def stage_overrides(bundle: Path, competition: Path, working: Path, weights: str | None) -> list[str]:
    """The overrides that point a bundled config at this machine's folders."""
    overrides = [f"paths.data_root={working}", f"paths.raw={competition}", f"paths.runs={bundle / 'runs'}"]
    if weights:
        overrides.append(f"features.weights={bundle / weights}")
    return overrides


def decoder_processes(gpu: bool, cores: int | None) -> int:
    """Stage 05's ``runtime.workers`` on this machine: with a GPU, one decoder process per core (the GPU
    encodes; the cores decode PNGs, the bottleneck on Kaggle's 4); without one, 1 (decoding and encoding
    take turns in one process, the encoder using every core)."""
    return max(1, cores or 1) if gpu else 1


def gpu_visible() -> bool:
    """Whether stage 05's consumers would run on GPUs (:func:`ubc_ocean.device.visible_devices`, as the
    pipeline picks them)."""
    from ubc_ocean.device import visible_devices  # imports torch: here, not when the notebook imports this module

    return visible_devices("auto")[0].type == "cuda"


def run_bundle(bundle: str | Path, competition: str | Path, working: str | Path,
               extra: Sequence[str] = (), echo: Callable[[str], None] = print) -> Path:
    """Stage 05 per experiment, then stage 06; returns the submission (``{working}/submission.csv``).
    Stage 05 gets :func:`decoder_processes` as ``runtime.workers`` (the bundled config's value is the training
    machine's). ``extra`` overrides go to every stage and win (e.g. ``runtime.workers=2``)."""
    bundle, competition, working = Path(bundle), Path(competition), Path(working)
    manifest = read_manifest(bundle)
    experiments = manifest["experiments"]
    gpu = gpu_visible()
    workers = decoder_processes(gpu, os.cpu_count())
    echo(f"stage 05: {workers} decoder process{'es' if workers > 1 else ''} "
         f"({'a GPU encodes, the cores decode' if gpu else 'no GPU: decode and encode in one process'})")
    for name, info in experiments.items():
        overrides = stage_overrides(bundle, competition, working, info.get("weights"))
        run_stage(STAGE_05, bundle / info["config"], [*overrides, f"runtime.workers={workers}", *extra], echo,
                  f"stage 05 ({name})")
    first = next(iter(experiments.values()))
    overrides = stage_overrides(bundle, competition, working, first.get("weights"))
    run_stage(STAGE_06, bundle / manifest["config"], [*overrides, *extra], echo, "stage 06")
    submission = working / "submission.csv"
    if not submission.is_file():
        raise StageFailed(f"stage 06 ended without writing {submission}")
    return submission


def run_stage(stage: str, config: Path, overrides: Sequence[str], echo: Callable[[str], None], title: str) -> None:
    """One stage in its own process, its output echoed line by line; ``StageFailed`` on a non-zero exit."""
    command = [sys.executable, "-c", _LAUNCH, stage, "--config", str(config), *overrides]
    echo(f"=== {title}: {' '.join(command[3:])}")
    start = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if "\r" in line:  # progress bars: keep the last state only
                line = line.rsplit("\r", 1)[-1] or line.replace("\r", "")
            echo(line.rstrip("\n"))
    if process.returncode != 0:
        raise StageFailed(f"{title} failed with exit status {process.returncode} (see the lines above)")
    echo(f"=== {title}: done in {time.monotonic() - start:.0f} s")
