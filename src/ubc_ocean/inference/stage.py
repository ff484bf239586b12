"""Stage 05: embed each raw test image in one streaming pass and predict it with every trained model.

Test embeddings are cached beside the training ones (``{embeddings}/test/{image_id}.h5``, in the folder
named without the stain jitter variant: ``features.stain_augmentation`` jitters training tiles only, never test
ones, see ``layout.test_embeddings_root``) so a rerun or a second model costs no re-embedding; tiles are
never written. Per model it writes
``{predictions}/{experiment}/{model}/test_predictions.csv`` (``paths.predictions``: the run folder by
default): image_id, one probability column per class (mean over every fold x seed checkpoint), and the
outlier scores; beside it ``test_predictions.json`` records the checkpoints (sha256) and the test
features they were made from, which stage 06 checks. The trained run is only read (it may be read-only).

Only complete models are used (``layout.chosen_models``), and before any image is embedded every
checkpoint's ``in_dim`` must agree with the others' and with the configured encoder's feature width, and
every model must have been trained on features of the identity this config computes
(``encoders.identity.feature_identity``). With ``features.stain_normalisation`` on, the run's stain reference
(``{runs}/{experiment}/stain_reference.json``, copied there by stage 04) must be there and be the one each model
was trained with: the test tiles are normalised to it, and each test h5 records its sha256 (a cached test
embedding made with another reference is embedded again).

Images are embedded by the pipelined fused inference (:mod:`ubc_ocean.inference.pipeline`) under the time
budget, if any (:mod:`ubc_ocean.inference.budget`), and predicted as their features arrive (a model trained
with the tumour scorer sees each bag cut down by its ``tumour_scorer.json``, as in training); an unsharded
run rewrites a complete provisional submission (:mod:`ubc_ocean.submit.submission`) as they do, unless
``inference.provisional_submission`` is false. An image that fails is its row in ``failures_05.csv``; when
every image tried (two or more) fails with the same unexpected error, a bug or a broken install rather than
bad files, the stage ends with :class:`~ubc_ocean.parallel.AllTasksFailed` (exit status 1), as stages 01
and 03 do, instead of writing predictions of nothing.

A model trained with CORAL feature alignment (its completion record's ``feature_alignment``) does not
predict as features arrive: the test tiles' moments are counted as they do, and once every image is
embedded each is read back from its h5, aligned and predicted (:mod:`ubc_ocean.inference.alignment`; a
sharded run's statistics are its own shard's).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ubc_ocean import embedding_cache, layout
from ubc_ocean.config import ConfigError, save_config
from ubc_ocean.device import resolve_device
from ubc_ocean.encoders.identity import check_identity, feature_identity, feature_width
from ubc_ocean.inference.adaptation import adapt_to_test_images
from ubc_ocean.inference.alignment import DeferredAlignment, deferred_alignment, read_alignment
from ubc_ocean.inference.budget import BudgetImage, BudgetPlanner
from ubc_ocean.inference.decoding import SlideJob
from ubc_ocean.inference.pipeline import FusedPipeline
from ubc_ocean.io_utils import FailureLog, atomic_write_csv, clean_stale_temporaries
from ubc_ocean.mil.bags import BagError, check_bag, load_bags
from ubc_ocean.mil.checkpoint import checkpoint_in_dim
from ubc_ocean.mil.predict import CheckpointEnsemble
from ubc_ocean.mil.train import model_training_config
from ubc_ocean.mil.tumour import TileChooser
from ubc_ocean.outliers import SCORE_NAMES
from ubc_ocean.parallel import UnexpectedErrors, parse_shard, select_shard, shard_output
from ubc_ocean.sources import TEST, SlideSpec, competition_specs, is_tma_by_image, read_test_csv, spec_is_tma
from ubc_ocean.stain_normalisation import StainReference, reference_attrs
from ubc_ocean.submit.submission import EnsembleCalibration, ProvisionalSubmission

log = logging.getLogger(__name__)
STAGE = "05_infer_test"
clock = time.monotonic  # the time budget's clock (tests simulate it)


def model_names(cfg: Mapping) -> list[str]:
    """Models to predict with: ``inference.models`` (each a complete model, else a ``ConfigError``) or every
    complete model of the run (other folders skipped with a warning)."""
    return layout.required_models(cfg)


def check_feature_widths(cfg: Mapping, names: list[str], width: int) -> None:
    """Every checkpoint of ``names`` must take ``width``-wide features (the configured encoder's), and so
    agree with each other: a ``ConfigError`` naming the checkpoints (and the encoder) otherwise."""
    widths = {f"{name}/{path.name}": checkpoint_in_dim(path)
              for name in names for path in layout.model_dir(cfg, name).checkpoints()}
    first = next(iter(widths.items()), None)
    other = next(((key, dim) for key, dim in widths.items() if first and dim != first[1]), None)
    if first and other:
        raise ConfigError(f"the checkpoints disagree on the feature width: {first[0]} takes {first[1]}, {other[0]} "
                          f"takes {other[1]} (trained on different encoders' features); choose models with "
                          "inference.models or retrain (stage 04)")
    if first and first[1] != width:
        raise ConfigError(f"{first[0]} takes {first[1]}-wide features, but features.encoder "
                          f"{cfg['features']['encoder']!r} makes {width}-wide ones: set the encoder the models "
                          "were trained with, or retrain them (stage 04)")


def check_feature_identities(cfg: Mapping, names: list[str]) -> None:
    """Every model must have been trained on features of the identity this config computes (encoder,
    weights, input size, tile size, magnification, tile encoding, width): a ``ConfigError`` naming both
    sides otherwise. Models recorded before identities were (no ``features`` in their completion record)
    are checked by their embeddings folder name, which encodes the same facts."""
    computed, folder = feature_identity(cfg), layout.embeddings_root(cfg).name
    for name in names:
        record = layout.model_dir(cfg, name).read_completion()
        trained = record.get("features")
        if isinstance(trained, dict):
            check_identity(name, trained, computed)
        elif record.get("embeddings") not in (None, folder):
            raise ConfigError(f"model {name!r} was trained on the features in {record['embeddings']!r}, this "
                              f"config computes those of {folder!r}: set features.* and tiling.* as for its "
                              "training, or retrain (stages 03-04)")


def load_stain_reference(cfg: Mapping, names: list[str]) -> StainReference | None:
    """The run's stain reference when ``features.stain_normalisation`` is on (None when off), checked before
    any image is embedded: a ``ConfigError`` naming the file when it is missing or unreadable, of another
    method, or not the one a model was trained with (its completion record's ``stain_reference``)."""
    method = str(cfg["features"]["stain_normalisation"])
    if method == "none":
        return None
    path = layout.run_stain_reference(cfg)
    remedy = (f"stage 04 copies it there from stage 03's {layout.stain_reference_path(layout.embeddings_root(cfg))}"
              ": rerun stage 04 (or copy that file there), or set features.stain_normalisation as the models "
              "were trained")
    try:
        stain = StainReference.load(path)
    except FileNotFoundError:
        raise ConfigError(f"features.stain_normalisation={method} normalises the test tiles to the run's stain "
                          f"reference, but {path} is missing; {remedy}") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"the run's stain reference {path} is unusable ({err}); {remedy}") from None
    if stain.method != method:
        raise ConfigError(f"the run's stain reference {path} is {stain.method}'s, the config asks for {method}; "
                          f"{remedy}")
    for name in names:
        trained = layout.model_dir(cfg, name).read_completion().get("stain_reference")
        if trained is not None and trained != stain.sha256:
            raise ConfigError(f"model {name!r} was trained on features normalised to another stain reference "
                              f"(sha256 {str(trained)[:12]}) than {path} ({stain.sha256[:12]}): retrain it (stage 04)")
    log.info("test tiles are stain-normalised (%s) to %s", method, path)
    return stain


def load_predictors(cfg: Mapping, names: list[str]) -> dict[str, CheckpointEnsemble]:
    """Each model's checkpoints, loaded once, to predict every test image as its features arrive."""
    device = resolve_device(cfg["runtime"]["device"])
    predictors = {}
    for name in names:
        training = model_training_config(cfg["mil"], name)
        predictors[name] = CheckpointEnsemble(layout.model_dir(cfg, name).checkpoints(), device,
                                              str(training["precision"]), int(training["max_instances_predict"]))
    return predictors


def load_choosers(cfg: Mapping, names: list[str]) -> dict[str, TileChooser | None]:
    """Each model's tile chooser: the tumour scorer it was trained with (its completion record's
    ``tumour``), which cuts every test bag down as training did; None for a model trained without one.
    Checked before any image is embedded: an unreadable scorer is a ``ConfigError`` naming it."""
    choosers: dict[str, TileChooser | None] = {}
    for name in names:
        model = layout.model_dir(cfg, name)
        if not model.read_completion().get("tumour"):
            choosers[name] = None
            continue
        try:
            choosers[name] = TileChooser.load(model.tumour_scorer)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model {name!r} was trained with a tumour scorer, but {err}: retrain it (stage 04)") \
                from None
        log.info("%s: test bags keep their most tumour-like tiles (%s)", name, choosers[name].record())
    return choosers


def load_alignments(cfg: Mapping, names: list[str], root: Path, width: int) -> DeferredAlignment | None:
    """The models trained with CORAL feature alignment (their completion record's ``feature_alignment``), whose
    predictions wait for every test image; None when there are none. Checked before any image is embedded."""
    models = {}
    for name in names:
        model = layout.model_dir(cfg, name)
        alignment = read_alignment(name, model.read_completion(), model.source_statistics, width)
        if alignment is not None:
            models[name] = alignment
    return deferred_alignment(models, root, width, cfg["runtime"]["shard"])


def writes_provisional(cfg: Mapping) -> bool:
    """Whether this run rewrites the provisional submission: unsharded runs with
    ``inference.provisional_submission`` only (a shard knows only its own images, and would overwrite what
    the others found; the Kaggle runner's later experiments leave the earlier one's submission standing). A
    shard ``0/1`` is the whole set, as :func:`~ubc_ocean.parallel.shard_output` counts it."""
    return parse_shard(cfg["runtime"]["shard"])[1] == 1 and bool(cfg["inference"]["provisional_submission"])


def provisional_submission(cfg: Mapping, names: list[str]) -> ProvisionalSubmission | None:
    """The complete submission rewritten as predictions arrive, when :func:`writes_provisional`."""
    if not writes_provisional(cfg):
        return None
    calibration = EnsembleCalibration.from_oof({n: layout.model_dir(cfg, n).read_oof() for n in names}, cfg)
    return ProvisionalSubmission(layout.submission_path(cfg), read_test_csv(cfg)["image_id"].astype(str),
                                 calibration, is_tma_by_image(cfg))


def budget_image(spec: SlideSpec, cfg: Mapping) -> BudgetImage:
    """A test image as the time budget sees it: its size from ``test.csv`` and whether it is a TMA."""
    width, height = spec.expected_size or (0, 0)
    return BudgetImage(spec.slide_id, int(width) * int(height), spec_is_tma(spec, cfg["slides"]))


def reusable(path: Path, budgeted: bool, made_with: Mapping[str, str] | None = None) -> bool:
    """A cached test embedding is reused when complete, made as ``made_with`` says (the attributes of the run's
    stain reference and of the test images' batch-norm statistics, when they are used), and, if a time budget
    made it with fewer tiles, only by another budgeted run (an unbudgeted run embeds the image in full)."""
    if not embedding_cache.is_complete(path) or not embedding_cache.made_with_attrs(path, made_with):
        return False
    return budgeted or embedding_cache.read_attrs(path).get("inference_mode", "full") == "full"


class Predictions:
    """Every model's test predictions as they arrive, written out at the end; the provisional submission
    follows them. Models trained with CORAL (``alignment``) wait for :meth:`add_aligned`."""

    def __init__(self, predictors: dict[str, CheckpointEnsemble], provisional: ProvisionalSubmission | None,
                 choosers: Mapping[str, TileChooser | None] | None = None,
                 alignment: DeferredAlignment | None = None):
        self.predictors, self.provisional = predictors, provisional
        self.choosers = dict(choosers or {})  # model -> its tumour tile choice (None: whole bags)
        self.frames: dict[str, list[pd.DataFrame]] = {name: [] for name in predictors}
        self.alignment = alignment
        self.streaming = [name for name in predictors if alignment is None or name not in alignment.models]

    def add(self, bags: dict[str, torch.Tensor]) -> None:
        """Newly arrived images: predicted by the streaming models, counted for the aligned ones."""
        if not bags:
            return
        if self.alignment is not None:
            self.alignment.observe(bags)
        self._predict({name: bags for name in self.streaming})

    def add_aligned(self) -> None:
        """The CORAL models' predictions, once every image is in: each image read back, aligned, predicted."""
        if self.alignment is None:
            return
        aligned: dict[str, list[pd.DataFrame]] = {}
        for slide_id, bags in self.alignment.aligned_bags():
            for name, frame in self._predict({name: {slide_id: bag} for name, bag in bags.items()},
                                             provisional=False).items():
                aligned.setdefault(name, []).append(frame)
        if self.provisional is not None and aligned:  # at once: no rewrite sees a model half predicted
            self.provisional.add({name: pd.concat(frames, ignore_index=True) for name, frames in aligned.items()})

    def _predict(self, bags: Mapping[str, Mapping[str, torch.Tensor]],
                 provisional: bool = True) -> dict[str, pd.DataFrame]:
        """Predict each model's ``{slide id: bag}`` (cut down by its tumour chooser, if any); the provisional
        submission gets the new frames too (unless ``provisional`` is false); returns them."""
        new = {}
        for name, slides in bags.items():
            if not slides:
                continue
            chooser = self.choosers.get(name)
            frame = self.predictors[name].predict(
                [bag if chooser is None else chooser.select(bag) for bag in slides.values()])
            frame.insert(0, "image_id", [slide_id.split("/", 1)[1] for slide_id in slides])
            self.frames[name].append(frame)
            new[name] = frame
        if provisional and self.provisional is not None and new:
            self.provisional.add(new)
        return new

    def table(self, name: str, cfg: Mapping) -> pd.DataFrame:
        if self.frames[name]:
            return pd.concat(self.frames[name], ignore_index=True).sort_values("image_id", ignore_index=True)
        classes = list(cfg["data"]["classes"])  # every image failed, or the shard is empty: an empty table
        return pd.DataFrame(columns=["image_id", *classes, *(f"score_{name}" for name in SCORE_NAMES)])


def embed_and_predict(cfg: Mapping, specs: list[SlideSpec], root: Path, predictions: Predictions,
                      failures: FailureLog, start: float, stain: StainReference | None = None,
                      made_with: Mapping[str, str] | None = None) -> None:
    """Embed the ``specs`` through the pipelined fused inference under the time budget (if any), writing
    each image's h5 (with the ``made_with`` attributes) and predicting it as soon as its features arrive
    (``stain``: the run's stain reference the tiles are normalised to, with ``features.stain_normalisation``
    on)."""
    inference = cfg["inference"]
    minutes = inference["time_budget_minutes"]
    budget_s = None if minutes is None else float(minutes) * 60 * (1 - float(inference["budget_reserve"]))
    pipeline = FusedPipeline(cfg, stain=stain)
    images = {spec.slide_id: budget_image(spec, cfg) for spec in specs}
    by_id = {spec.slide_id: spec for spec in specs}
    planner = BudgetPlanner(list(images.values()), budget_s, full_tiles=int(cfg["tiling"]["max_tiles_per_slide"]),
                            min_tiles=int(inference["budget_min_tiles"]), decoders=pipeline.workers,
                            consumers=len(pipeline.devices), pipelined=not pipeline.in_process,
                            clock=clock, start=start)

    def next_job() -> SlideJob | None:
        chosen = planner.next()
        if chosen is None:
            return None
        image, mode = chosen
        return SlideJob(by_id[image.key], mode.max_tiles, mode.row_fraction)

    encoder = pipeline.encoders[0]
    finished: set[str] = set()
    unexpected = UnexpectedErrors()
    bar = tqdm(total=len(specs), desc="test slides", unit="slide", dynamic_ncols=True)
    try:
        for result in pipeline.run(next_job, should_stop=planner.expired):
            slide_id = result.job.spec.slide_id
            finished.add(slide_id)
            bar.update(1)
            if result.status == "done":
                try:
                    check_bag(result.features, slide_id)
                except BagError as err:
                    result.status, result.message = "failed", f"{result.job.spec.path.name}: {err}"
            if result.status == "failed":
                log.error("%s: %s", slide_id, result.message)
                failures.record(slide_id, result.message)
                unexpected.record(result.error, result.message)
                continue
            attrs = layout.embedding_attrs(cfg, encoder.name, encoder.weights_id, encoder.input_size, slide_id,
                                           is_tma=bool(result.info["is_tma"]), stain_augmentation=0.0,
                                           inference_mode=result.job.describe(), **(made_with or {}))
            embedding_cache.write_embeddings(layout.embedding_path(root, TEST, result.job.spec.image_id),
                                             result.features, result.coords, attrs)
            planner.observe(images[slide_id], result.decode_s, result.decoded_pixels, result.tiles, result.encode_s)
            predictions.add({slide_id: torch.from_numpy(result.features.astype(np.float16))})
    finally:
        bar.close()
    planner.give_up()
    for spec in specs:
        if spec.slide_id not in finished:
            message = (f"{spec.path.name}: the time budget ({minutes:g} min) ran out before it was embedded; "
                       "labelled by the submission's fallback")
            log.warning("%s: %s", spec.slide_id, message)
            failures.record(spec.slide_id, message)
    stats = pipeline.stats
    log.info("stage 05: %d images embedded in %.0f s, %d tiles; encoder busy %.0f%% of the time on %s",
             len(finished), stats.wall_s, stats.tiles, 100 * stats.busy_fraction, ", ".join(stats.devices))
    unexpected.check("test slides", len(specs), len(finished))


def run(cfg: Mapping) -> dict[str, Path]:
    """Embed (this shard's share of) the test images and predict each with every model as it arrives."""
    start = clock()
    # trained models may be read-only (Kaggle)
    layout.require_writable(cfg, "processed", "predictions", *(["submissions"] if writes_provisional(cfg) else []))
    names = model_names(cfg)
    width = feature_width(cfg)
    check_feature_widths(cfg, names, width)
    check_feature_identities(cfg, names)
    stain = load_stain_reference(cfg, names)
    root = layout.test_embeddings_root(cfg)
    test_root = root / TEST
    test_root.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(test_root)
    out = layout.predictions_dir(cfg)
    save_config(cfg, out, "config_05.yaml")
    shard = cfg["runtime"]["shard"]
    specs = select_shard(competition_specs(cfg, TEST), shard, key=lambda s: s.slide_id)
    failures = FailureLog(shard_output(out, "failures_05.csv", shard), STAGE)
    failures.path.unlink(missing_ok=True)
    predictions = Predictions(load_predictors(cfg, names), provisional_submission(cfg, names),
                              load_choosers(cfg, names), load_alignments(cfg, names, root, width))
    budgeted = cfg["inference"]["time_budget_minutes"] is not None
    adaptation = adapt_to_test_images(cfg, specs, test_root, stain)  # before any image is embedded
    made_with = {**reference_attrs(stain), **adaptation}
    cached = {s.slide_id: layout.embedding_path(root, TEST, s.image_id) for s in specs
              if reusable(layout.embedding_path(root, TEST, s.image_id), budgeted, made_with)}
    bags, problems = load_bags(cached, width)
    for slide_id, message in problems.items():
        failures.record(slide_id, message)
    predictions.add(dict(sorted(bags.items())))
    todo = [s for s in specs if s.slide_id not in cached]
    if todo:
        embed_and_predict(cfg, todo, root, predictions, failures, start, stain, made_with)
    predictions.add_aligned()
    written = {}
    features = layout.test_features_fingerprint(cfg)
    for name in names:
        model = layout.model_dir(cfg, name)
        record = model.predictions_record(shard)
        record.unlink(missing_ok=True)  # predictions without their record are refused by stage 06
        frame = predictions.table(name, cfg)
        path = model.predictions(shard)
        atomic_write_csv(frame, path)
        model.write_predictions_record(shard, predictions.predictors[name].used, features)
        written[name] = path
        log.info("stage 05: %s predicted %d test images -> %s", name, len(frame), path)
    if predictions.provisional is not None:
        predictions.provisional.write(force=True)
    if failures.count:
        log.warning("stage 05: %d test images without prediction (see %s); stage 06 labels them",
                    failures.count, failures.path)
    return written
