"""What the bundle's notebook runs once the wheels are installed: stage 05 for each bundled experiment (with
that experiment's config: its encoder and tiling), then stage 06 over all of them.

Each stage runs in its own Python process through the stages' front door (``ubc_ocean.cli.main``), as the
numbered scripts do: a config error is one line and exit status 2, and the memory of one experiment's
encoder is returned before the next. Paths come from where the notebook found things: ``paths.raw`` the
competition data, ``paths.runs`` the bundle's ``runs/`` (read-only), ``paths.data_root`` the working folder
under which every output goes, ``features.weights`` a weights file inside the bundle.

A time budget (``inference.time_budget_minutes`` of the bundle's ``config.yaml``, or of ``extra``) is the
whole bundle's, from the first stage 05 to the end of stage 06: each experiment's stage 05 gets the time
left shared equally among the experiments not run yet (what one leaves unused goes to the next), and an
experiment with nothing left beyond stage 06's reserve is not run. The first experiment's stage 05 writes
the provisional submission; the later ones leave it standing, so a run cut short still has a complete
submission on disk; stage 06 ensembles the experiments that ran.

In Kaggle's scoring rerun (``KAGGLE_IS_COMPETITION_RERUN`` set), where a notebook that raises scores nothing
and nobody reads its log, a failed experiment is left out of the ensemble and a failed stage 06 leaves the
provisional submission standing, each said loudly; elsewhere (the interactive run on the few visible test
images, a rehearsal) any failure stops the run, so it is seen and mended before submitting.
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
BUDGET_KEY = "inference.time_budget_minutes"
RERUN_VARIABLE = "KAGGLE_IS_COMPETITION_RERUN"  # set by Kaggle in the scoring rerun on the hidden test set
monotonic = time.monotonic  # the budget's clock (tests simulate it)
KAGGLE_DECODING = ("runtime.workers=1", "inference.decoders=auto")  # stage 05 decides on this machine, not the bundle's
MIN_SHARE_MINUTES = 1e-6  # a stage-05 budget must be > 0: the first experiment always runs, however late
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


class BundleBudget:
    """The bundle's time budget shared among its experiments' stage 05 runs (see the module's notes);
    ``minutes`` None: no budget."""

    def __init__(self, minutes: float | None, reserve: float):
        self.minutes, self.reserve = minutes, reserve
        self.start = monotonic()

    def left_minutes(self) -> float:
        return float("inf") if self.minutes is None else self.minutes - (monotonic() - self.start) / 60

    def share(self, experiments_left: int) -> float | None:
        """Stage 05's budget for the next of ``experiments_left`` experiments: the time left shared
        equally (None without a budget; never 0, which no stage takes)."""
        if self.minutes is None:
            return None
        return max(self.left_minutes(), MIN_SHARE_MINUTES) / max(1, experiments_left)

    def spent(self) -> bool:
        """No more than stage 06's reserve left: no further stage 05 is started."""
        return self.minutes is not None and self.left_minutes() <= self.reserve * self.minutes


def bundle_budget(config: Path, overrides: Sequence[str], extra: Sequence[str]) -> BundleBudget:
    """The budget of ``config`` (the bundle's ``config.yaml``) with the overrides: its
    ``inference.time_budget_minutes`` and ``inference.budget_reserve``."""
    from ubc_ocean.config import load_config

    inference = load_config(config, [*overrides, *extra])["inference"]
    minutes = inference["time_budget_minutes"]
    return BundleBudget(None if minutes is None else float(minutes), float(inference["budget_reserve"]))


def scoring_rerun() -> bool:
    """Whether this is Kaggle's scoring rerun on the hidden test set (it sets ``KAGGLE_IS_COMPETITION_RERUN``)."""
    return bool(os.environ.get(RERUN_VARIABLE))


def run_bundle(bundle: str | Path, competition: str | Path, working: str | Path,
               extra: Sequence[str] = (), echo: Callable[[str], None] = print,
               keep_going: bool | None = None) -> Path:
    """Stage 05 per experiment, then stage 06; returns the submission (``{working}/submission.csv``).
    Stage 05 gets ``runtime.workers=1`` and ``inference.decoders=auto`` (one decoder process per core when a GPU
    encodes, else decoding and encoding in turn in one process: the bundled config's numbers are the training
    machine's) and its share of the time budget (see the module's notes).
    ``extra`` overrides go to every stage and win (e.g. ``inference.decoders=2``), except the budget's, which
    the runner shares out.
    ``keep_going`` (default: :func:`scoring_rerun`) ends with the best submission the stages that worked
    allow instead of raising :class:`StageFailed`; with no experiment predicted it raises all the same."""
    keep_going = scoring_rerun() if keep_going is None else keep_going
    bundle, competition, working = Path(bundle), Path(competition), Path(working)
    manifest = read_manifest(bundle)
    experiments = manifest["experiments"]
    first = next(iter(experiments.values()))
    final_overrides = stage_overrides(bundle, competition, working, first.get("weights"))
    budget = bundle_budget(bundle / manifest["config"], final_overrides, extra)
    extra = [o for o in extra if o.split("=", 1)[0].strip() != BUDGET_KEY]
    if budget.minutes is not None:
        echo(f"time budget: {budget.minutes:g} min for stages 05 and 06, shared among {len(experiments)} "
             f"experiment{'s' if len(experiments) > 1 else ''}")
    ran = []
    for position, (name, info) in enumerate(experiments.items()):
        if ran and budget.spent():
            echo(f"stage 05 ({name}): not run, the time budget is spent ({budget.left_minutes():.1f} min left "
                 "for stage 06)")
            continue
        share = budget.share(len(experiments) - position)
        overrides = [*stage_overrides(bundle, competition, working, info.get("weights")), *KAGGLE_DECODING,
                     f"{BUDGET_KEY}={'null' if share is None else format(share, '.6g')}"]
        if ran:  # the first experiment's submission stands while a later one runs
            overrides.append("inference.provisional_submission=false")
        try:
            run_stage(STAGE_05, bundle / info["config"], [*overrides, *extra], echo, f"stage 05 ({name})")
        except StageFailed as err:
            if not keep_going:
                raise
            echo(f"!!! {err}: experiment {name} is left out of the submission")
            continue
        ran.append(name)
    if not ran:
        raise StageFailed("no experiment's stage 05 ended: nothing to submit")
    if len(experiments) > 1 and len(ran) < len(experiments):
        final_overrides.append(f"submit.experiments={json.dumps(ran)}")
    submission = working / "submission.csv"
    try:
        run_stage(STAGE_06, bundle / manifest["config"], [*final_overrides, *extra], echo, "stage 06")
        if not submission.is_file():
            raise StageFailed(f"stage 06 ended without writing {submission}")
    except StageFailed as err:
        if not (keep_going and submission.is_file()):
            raise
        echo(f"!!! {err}: the provisional submission stage 05 wrote stands ({submission})")
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
