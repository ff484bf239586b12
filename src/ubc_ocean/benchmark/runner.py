"""scripts/benchmark.py: stage 00 once, then stages 01-06 for each configuration of ``benchmark.configurations``
on the same data, each scored on the hidden test labels with bootstrap intervals and paired differences
against the baseline.

Every configuration is its config plus its overrides, run as experiment ``{experiment}-{name}`` with the
submission ``{experiment}-{name}.csv``; all are loaded and checked (keys, values, MIL model names) before any
work. The data root is shared: stage 01 reuses the tiles of a tiling key already cut, stage 03 the embeddings
of an encoder and tiling already computed, stage 05 the test embeddings; stage 02 rewrites the manifest for
each configuration's tiling (cheap), stages 04-06 always run (each configuration's own experiment). The stages
run in this process, one after the other (each frees its models when it returns; slide work runs in
``runtime.workers`` processes as usual); each configuration's log goes to its own file as well. With
``benchmark.resume``, a configuration that ran to the end with the same settings (``done.json``) is read back.

With ``benchmark.grouped_folds`` (a ``folds.group_by`` value: ``hospital``, ``stain_cluster``), each configuration
is trained once more on folds grouped so, as experiment ``{experiment}-{name}-grouped``: stage 02 writes the
grouped folds, stage 04 trains on them, the ensemble's OOF balanced accuracy is read from its OOF predictions
(no test prediction), and stage 02 then writes the configuration's own folds back. Each validation fold then
plays an unseen hospital; the results gain ``oof_ba_grouped`` and the RESULT line ``oof_test_rank_grouped``.

The best configuration is the one of highest OOF balanced accuracy: nothing is chosen on the test split.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ubc_ocean import embedding_cache, layout
from ubc_ocean.benchmark.report import DELTAS, Outcome, markdown_table, result_line, results_frame
from ubc_ocean.benchmark.stats import METRICS, Bootstrapped, choose_best, site_predictability
from ubc_ocean.config import Config, ConfigError, as_plain, save_config, with_overrides
from ubc_ocean.encoders.identity import feature_width
from ubc_ocean.folds import is_synthetic
from ubc_ocean.io_utils import atomic_write_csv, atomic_write_text
from ubc_ocean.metrics import bootstrap_counts
from ubc_ocean.mil.alignment import CoralSettings, TileStatistics
from ubc_ocean.sources import TEST, TRAIN
from ubc_ocean.submit.score import scored_frame

log = logging.getLogger(__name__)


def stages(cfg: Mapping | None = None) -> tuple[tuple[str, Callable[[Config], object]], ...]:
    """Stages 01-06 in order, by the name their timings are reported under; for a configuration ``cfg`` whose
    ``features.weights`` is ``adapted``, stage 02b (adapting the encoder) before 03. Imported when the work
    starts, so that a bad configuration is reported before torch and the models load."""
    from ubc_ocean.external.stage import run as merge
    from ubc_ocean.features.stage import run as embed
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train
    from ubc_ocean.submit.stage import run as submit
    from ubc_ocean.tiling.stage import run as tile

    adapt: tuple[tuple[str, Callable[[Config], object]], ...] = ()
    if cfg is not None and layout.uses_adapted_encoder(cfg):
        from ubc_ocean.adaptation.stage import run as adapt_encoder

        adapt = (("02b_adapt", adapt_encoder),)
    return (("01_tile", tile), ("02_merge", merge), *adapt, ("03_embed", embed), ("04_train", train),
            ("05_infer", infer), ("06_submit", submit))


@dataclass(frozen=True)
class Configuration:
    """One benchmark configuration: its name, overrides and resolved config."""

    name: str
    overrides: list[str]
    cfg: Config
    grouped: Config | None = None  # the same on benchmark.grouped_folds folds, its own experiment (else None)


@dataclass
class Summary:
    """What the benchmark wrote, and the lines it ends with (the Markdown table, wall times, RESULT)."""

    results: pd.DataFrame
    markdown: str
    result: str
    failed: list[str]
    folder: Path

    @property
    def text(self) -> str:
        times = ", ".join(f"{row.configuration} {row.wall_s:.0f} s" for _, row in self.results.iterrows())
        return f"{self.markdown}\nwall times: {times}\nresults: {self.folder / 'results.md'}\n{self.result}"


def configurations(cfg: Config) -> list[Configuration]:
    """Every configuration's config, checked whole (keys, values, MIL models built once at the encoder's
    width) before any work: a bad one is a ``ConfigError`` naming it."""
    if cfg["runtime"]["shard"] is not None:
        raise ConfigError(f"the benchmark scores every test image: runtime.shard must be null; "
                          f"got {cfg['runtime']['shard']!r}")
    out = []
    group_by = cfg["benchmark"]["grouped_folds"]
    for entry in cfg["benchmark"]["configurations"]:  # every config loaded first: its errors come in a second
        name, overrides = entry["name"], list(entry["overrides"])
        experiment = layout.benchmark_experiment(cfg, name)
        with _named(name):
            resolved = with_overrides(cfg, [*overrides, f"experiment={experiment}", f"submit.name={experiment}"])
            grouped_experiment = layout.benchmark_grouped_experiment(cfg, name)
            grouped = None if group_by is None else with_overrides(
                resolved, [f"folds.group_by={group_by}", f"experiment={grouped_experiment}"])
        out.append(Configuration(name, overrides, resolved, grouped))
    experiments = [c.cfg["experiment"] for c in out] + [c.grouped["experiment"] for c in out if c.grouped]
    clash = sorted({e for e in experiments if experiments.count(e) > 1})
    if clash:
        raise ConfigError(f"benchmark.grouped_folds: the grouped experiments {clash} are also configurations' "
                          "experiments: rename those configurations")
    from ubc_ocean.mil.train import check_models  # torch and the encoder's architecture, for the widths

    for configuration in out:
        with _named(configuration.name):
            resolved = configuration.cfg
            check_models(resolved["mil"], feature_width(resolved), len(resolved["data"]["classes"]))
    return out


@contextlib.contextmanager
def _named(name: str) -> Iterator[None]:
    """A ``ConfigError`` raised in the block names benchmark configuration ``name``."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"benchmark configuration {name!r}: {err}") from None


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[None]:
    """Copy every log record of the package to ``path`` (appended) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def read_truth(cfg: Mapping) -> pd.DataFrame:
    """The hidden test labels (``image_id, label, is_tma``, ...) that stage 00 wrote; an error naming the file
    when they are missing (only synthetic data can be benchmarked)."""
    path = Path(cfg["paths"]["hidden_test_labels"])
    if not path.is_file():
        raise FileNotFoundError(f"no hidden test labels at {path}: the benchmark scores synthetic data only")
    truth = pd.read_csv(path, dtype={"image_id": str})
    missing = {"image_id", "label", "is_tma"} - set(truth.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}")
    return truth


def run_configuration(configuration: Configuration, truth: pd.DataFrame, folder: Path, outcome: Outcome,
                      position: str) -> pd.DataFrame:
    """Stages 01-06 for one configuration (their times and the OOF balanced accuracy into ``outcome``), then
    its test images scored: returned and written to ``scored.csv`` in ``folder``."""
    cfg = configuration.cfg
    log.info("benchmark configuration %s %s (experiment %s): %s", position, configuration.name, cfg["experiment"],
             " ".join(configuration.overrides) or "no overrides")
    for stage_name, stage in stages(cfg):
        start = time.perf_counter()
        try:
            stage(cfg)
        finally:  # a stage that fails counts its time too
            outcome.seconds[stage_name] = time.perf_counter() - start
        log.info("benchmark %s: %s done in %.1f s", configuration.name, stage_name, outcome.seconds[stage_name])
    report = json.loads(layout.ensemble_report_path(cfg).read_text())
    outcome.oof_ba = float(report["oof_balanced_accuracy"])
    scored = scored_frame(pd.read_csv(layout.submission_path(cfg), dtype={"image_id": str}), truth)
    atomic_write_csv(scored, folder / "scored.csv")
    outcome.site = site_predictability(*site_features(cfg, truth), seed=int(cfg["benchmark"]["seed"]))
    done = {"settings": settings(cfg), "oof_ba": outcome.oof_ba, "seconds": outcome.seconds, "site": outcome.site}
    atomic_write_text(folder / DONE, json.dumps(done, indent=1))
    return scored


def site_features(cfg: Mapping, truth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every competition training slide's mean tile embedding (stage 03's; no external or synthetic-core
    bags) and every test image's (stage 05's), with ``is_test`` and ``is_tma``: what
    :func:`~ubc_ocean.benchmark.stats.site_predictability` reads. Slides without embeddings are left out.
    When a model of the run aligns the test tiles with CORAL (``mil.feature_alignment``), the test means are
    the aligned ones, as that model sees them (the map is affine: the mean of the aligned tiles)."""
    manifest = layout.read_manifest(cfg)
    train = manifest[(manifest["source"] == TRAIN) & ~is_synthetic(manifest)]
    roots = {TRAIN: layout.embeddings_root(cfg), TEST: layout.test_embeddings_root(cfg)}
    slides = [(TRAIN, str(row.image_id), bool(row.is_tma)) for row in train.itertuples()]
    slides += [(TEST, str(row.image_id), bool(row.is_tma)) for row in truth.itertuples()]
    means, is_test, is_tma = [], [], []
    coral = run_coral(cfg)
    target = TileStatistics(coral[0].dim) if coral else None
    for source, image_id, tma in slides:
        path = layout.embedding_path(roots[source], source, image_id)
        if path.is_file():
            features = embedding_cache.read_embeddings(path)[0]
            means.append(features.mean(axis=0, dtype=np.float64))  # fp16 tiles: a CORAL map would amplify rounding
            is_test.append(source == TEST)
            is_tma.append(tma)
            if target is not None and source == TEST:
                target.add(features, tma)
    means, is_test, is_tma = np.asarray(means), np.asarray(is_test, bool), np.asarray(is_tma, bool)
    if coral and target is not None and target.pooled.count >= 2:
        alignment = coral[1].alignment(coral[0], target)
        for row in np.flatnonzero(is_test):
            means[row] = alignment.apply(means[row][None], bool(is_tma[row]))[0]
    return means, is_test, is_tma


def run_coral(cfg: Mapping) -> tuple[TileStatistics, CoralSettings] | None:
    """The training tiles' moments and the CORAL settings of the run's first model that aligns its test
    tiles (its completion record's ``feature_alignment``), or None."""
    for name in layout.chosen_models(cfg):
        model = layout.model_dir(cfg, name)
        entry = model.read_completion().get("feature_alignment")
        if entry:
            return TileStatistics.load(model.source_statistics), CoralSettings.from_record(entry)
    return None


DONE = "done.json"  # in a configuration's folder, written last: it ran to the end with these settings
GROUPED_DONE = "grouped.json"  # the same for its run on grouped folds: settings, OOF BA and stage times


def run_grouped(configuration: Configuration, folder: Path, outcome: Outcome, resume: bool) -> None:
    """Stages 02 and 04 of ``configuration.grouped`` (its folds grouped by ``benchmark.grouped_folds``), its
    ensemble's OOF balanced accuracy into ``outcome.oof_ba_grouped`` and ``grouped.json``; then stage 02 of the
    configuration again, so that the data root's folds are its own. With ``resume``, a grouped run of the same
    settings is read back."""
    cfg = configuration.grouped
    if cfg is None:
        raise ValueError(f"benchmark configuration {configuration.name!r} has no grouped-folds config")
    done = folder / GROUPED_DONE
    if resume and done.is_file():
        record = json.loads(done.read_text())
        if record.get("settings") == settings(cfg):
            outcome.oof_ba_grouped = float(record["oof_ba"])
            outcome.seconds |= dict(record["seconds"])
            log.info("benchmark %s (grouped folds): read back from %s (benchmark.resume)", configuration.name, done)
            return
    done.unlink(missing_ok=True)
    from ubc_ocean.submit.stage import oof_calibration

    run = dict(stages())
    seconds: dict[str, float] = {}
    log.info("benchmark %s: trained again on folds grouped by %s (experiment %s)", configuration.name,
             cfg["folds"]["group_by"], cfg["experiment"])
    try:
        for name, stage in (("02_merge_grouped", run["02_merge"]), ("04_train_grouped", run["04_train"])):
            start = time.perf_counter()
            try:
                stage(cfg)
            finally:
                seconds[name] = time.perf_counter() - start
        oof_ba = float(oof_calibration(cfg).metrics["balanced_accuracy"])
    finally:  # the configuration's own folds back (the next configuration's stage 02 would rewrite them anyway)
        start = time.perf_counter()
        run["02_merge"](configuration.cfg)
        seconds["02_merge_grouped"] = seconds.get("02_merge_grouped", 0.0) + time.perf_counter() - start
        outcome.seconds |= seconds
    outcome.oof_ba_grouped = oof_ba
    log.info("benchmark %s: OOF balanced accuracy %.3f on grouped folds (%.3f on plain ones)", configuration.name,
             oof_ba, outcome.oof_ba)
    atomic_write_text(done, json.dumps({"settings": settings(cfg), "oof_ba": oof_ba, "seconds": seconds}, indent=1))


def settings(cfg: Mapping) -> dict:
    """What a configuration's results depend on: its config but the ``benchmark`` and ``runtime`` sections (and
    ``adapt`` unless it embeds with its adapted encoder), as JSON would write it (so a value read back from
    ``done.json`` compares equal)."""
    unused = ("benchmark", "runtime") if layout.uses_adapted_encoder(cfg) else ("benchmark", "runtime", "adapt")
    return json.loads(json.dumps({key: value for key, value in as_plain(cfg).items() if key not in unused}))


def read_back(configuration: Configuration, folder: Path, outcome: Outcome) -> pd.DataFrame | None:
    """The scored test images of a configuration that already ran to the end with the same settings (its
    OOF balanced accuracy and stage times into ``outcome``), else None."""
    done, scored = folder / DONE, folder / "scored.csv"
    if not (done.is_file() and scored.is_file()):
        return None
    record = json.loads(done.read_text())
    if record.get("settings") != settings(configuration.cfg):
        log.info("benchmark %s: its settings changed since %s: running it again", configuration.name, done)
        return None
    outcome.oof_ba, outcome.seconds = float(record["oof_ba"]), dict(record["seconds"])
    outcome.site = dict(record.get("site", {}))
    log.info("benchmark %s: read back from %s (benchmark.resume)", configuration.name, folder)
    return pd.read_csv(scored, dtype={"image_id": str}).assign(is_tma=lambda f: f["is_tma"].astype(bool))


def run(cfg: Config) -> Summary:
    """Run the benchmark; write ``results.csv``, ``results.md`` and ``timings.csv`` under
    ``{runs}/{experiment}``. A configuration that fails is logged with its traceback and reported as
    failed; the others go on (the summary lists the failed ones)."""
    from ubc_ocean.synthetic import run as make_data

    plans = configurations(cfg)
    bench = cfg["benchmark"]
    baseline = bench["baseline"] or plans[0].name
    out = layout.benchmark_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, "config_benchmark.yaml")
    with log_file(out / "benchmark.log"):
        log.info("benchmark: %d configurations (%s), baseline %s -> %s", len(plans),
                 ", ".join(p.name for p in plans), baseline, out)
        start = time.perf_counter()
        make_data(cfg)
        timings = [{"configuration": "", "stage": "00_data", "seconds": time.perf_counter() - start}]
        truth = read_truth(cfg)
        outcomes, scored = [], {}
        for index, plan in enumerate(plans, 1):
            folder = layout.benchmark_configuration_dir(cfg, plan.name)
            outcome = Outcome(plan.name, str(plan.cfg["experiment"]), plan.overrides)
            with log_file(folder / "stages.log"):  # each configuration's own log, its traceback included
                try:
                    found = read_back(plan, folder, outcome) if bench["resume"] else None
                    if found is None:
                        (folder / DONE).unlink(missing_ok=True)
                        found = run_configuration(plan, truth, folder, outcome, f"{index}/{len(plans)}")
                    scored[plan.name] = found
                except Exception as err:  # reported, the other configurations go on
                    log.error("benchmark configuration %s failed: %s\n%s", plan.name, err, traceback.format_exc())
                    outcome.error = _message(err)
                if plan.grouped is not None and outcome.error is None:
                    try:
                        run_grouped(plan, folder, outcome, bool(bench["resume"]))
                    except Exception as err:  # its plain results stand; the grouped figure is missing
                        log.error("benchmark configuration %s failed on grouped folds: %s\n%s", plan.name, err,
                                  traceback.format_exc())
                        outcome.oof_ba_grouped, outcome.grouped_error = float("nan"), _message(err)
            outcomes.append(outcome)
            timings += [{"configuration": plan.name, "stage": s, "seconds": v} for s, v in outcome.seconds.items()]
        summary = _score(cfg, outcomes, scored, baseline)
        atomic_write_csv(pd.DataFrame(timings).round({"seconds": 2}), out / "timings.csv")
        log.info("benchmark done in %.0f s:\n%s", time.perf_counter() - start, summary.text)
    return summary


def _message(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]


def _score(cfg: Config, outcomes: list[Outcome], scored: Mapping[str, pd.DataFrame], baseline: str) -> Summary:
    """Bootstrap every scored configuration on the same resamples, pair each with the baseline, choose the
    best on OOF, and write the tables."""
    bench, outlier = cfg["benchmark"], str(cfg["data"]["outlier_label"])
    level = float(bench["confidence"])
    n_images = len(next(iter(scored.values()))) if scored else 0
    counts = bootstrap_counts(n_images, int(bench["bootstrap"]), int(bench["seed"]))
    boot = {name: Bootstrapped.of(frame, outlier, counts) for name, frame in scored.items()}
    for outcome in outcomes:
        if outcome.name in boot:
            outcome.scores = {metric: boot[outcome.name].estimate(metric, level) for metric in METRICS}
            if baseline in boot:
                outcome.deltas = {metric: boot[outcome.name].minus(boot[baseline], metric, level) for metric in DELTAS}
    order = [o.name for o in outcomes]
    best = choose_best({o.name: o.oof_ba for o in outcomes if o.error is None}, order)
    results = results_frame(outcomes, baseline, best)
    out = layout.benchmark_dir(cfg)
    markdown = markdown_table(results, level)
    atomic_write_csv(results, out / "results.csv")
    note = (f"Test images: {n_images}; {level * 100:g}% bootstrap percentile intervals over {bench['bootstrap']} "
            f"resamples of the test images (seed {bench['seed']}), the same resamples for every configuration; "
            f"Δ: paired difference against {baseline}. Bold: the best configuration by OOF balanced accuracy.")
    if bench["grouped_folds"]:
        note += (f" OOF BA (grouped): the same configuration trained on folds grouped by {bench['grouped_folds']} "
                 "(each validation fold a group its models never saw).")
    note += "\n\n"
    atomic_write_text(out / "results.md", note + markdown)
    failed = [o.name for o in outcomes if o.error] + [f"{o.name} (grouped folds)" for o in outcomes if o.grouped_error]
    return Summary(results, markdown, result_line(results), failed, out)
