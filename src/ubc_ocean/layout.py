"""Where every artefact lives, and how a stage reads what the stage before it wrote.

Stages meet only through these files and the typed config: a stage imports this module and library
modules, never another stage. The tree, under ``paths.*`` of the config::

    {raw}/{data.supplemental_masks}/{image_id}.png    optional tumour masks of training WSIs (read by stage 01)
    {interim}/tiles/{tiling key}/                      stage 01
        {source}/{image_id}/  tiles, index.csv (with tumour_fraction), slide.json, qc.png   (tile_store.py)
        failures*.csv
    {processed}/manifest.csv, folds.csv, failures_02.csv          stage 02
    {processed}/embeddings/{encoder}{variant}__{tiling key}/      stage 03 (training), 05 (test)
        {source}/{image_id}.h5   features [N, D], coords [N, 2], attrs (embedding_attrs)
        stain_reference.json     features.stain_normalisation on: the reference stage 03 fitted (stain_normalisation.py)
    {runs}/{experiment}/                                stage 04 (read by 05-06)
        config.yaml, failures_04.csv, stain_reference.json (copied by stage 04 when normalising; stage 05 reads it)
        {model}/fold{k}_seed{s}.pt, oof.csv, curves.csv, metrics.json, confusion.*, outlier.json,
        {model}/tumour_scorer.json, source_statistics.npz   only when trained with them (complete.json names them)
        {model}/complete.json         written last by stage 04: the model is whole (ModelDir.problem)
    {predictions}/{experiment}/                         stages 05-06 (default {predictions} = {runs}: the same folder)
        {model}/test_predictions*.csv, .json (what made them), failures_05*.csv, config_05.yaml,
        ensemble.json, config_06.yaml
    {submissions}/{submit.name}.csv                     stage 06
    {runs}/{experiment}/heatmaps/*.png, report.html, loco_*.csv   scripts/heatmaps.py, report.py, LOCO
    {runs}/{experiment}/results.csv, results.md, timings.csv,     scripts/benchmark.py (each configuration
        configurations/{name}/scored.csv, benchmark.log           trained as experiment {experiment}-{name})

Trained models may be read-only (a Kaggle dataset): stages 05-06 write only under ``paths.predictions``,
``paths.processed`` (test embeddings) and ``paths.submissions``, each checked writable before any work
(:func:`require_writable`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import pandas as pd

from ubc_ocean.config import ConfigError
from ubc_ocean.encoders.weights import cached_file_checksum, encoder_cache_name, file_checksum
from ubc_ocean.io_utils import FailureLog, MissingInput, atomic_write_text
from ubc_ocean.parallel import shard_output
from ubc_ocean.slides.magnification import native_magnification
from ubc_ocean.sources import TEST, TRAIN, SlideFiles, competition_specs, raw_path
from ubc_ocean.stain_normalisation import REFERENCE_FILE
from ubc_ocean.tile_store import read_slide_info, tiling_key

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- tiles (01)


STAGE_SCRIPTS = {
    "00": "00_make_synthetic_data.py", "01": "01_tile_slides.py", "02": "02_merge_external.py",
    "03": "03_cache_embeddings.py", "04": "04_train_cv.py", "05": "05_infer_test.py", "06": "06_ensemble_submit.py",
}


def run_stage_first(stage: str) -> str:
    """What makes a stage's artefacts, as a :class:`~ubc_ocean.io_utils.MissingInput` remedy: ``run stage 02
    first (scripts/02_merge_external.py)``."""
    return f"run stage {stage} first (scripts/{STAGE_SCRIPTS[stage]})"


def tiles_root(cfg: Mapping) -> Path:
    """``{interim}/tiles/{tiling key}``: two tilings never share a folder."""
    return Path(cfg["paths"]["interim"]) / "tiles" / tiling_key(cfg)


def slide_tiles_dir(cfg: Mapping, source: str, image_id: str) -> Path:
    """One slide's tile folder (complete once it exists: it is renamed into place)."""
    return tiles_root(cfg) / source / str(image_id)


def supplemental_masks_dir(cfg: Mapping) -> Path:
    """``{raw}/{data.supplemental_masks}``: the training WSIs' tumour masks (optional, not every slide has one)."""
    return raw_path(cfg, "supplemental_masks")


def supplemental_mask_path(cfg: Mapping, image_id: str | int) -> Path:
    """A training WSI's supplemental mask, ``{raw}/{data.supplemental_masks}/{image_id}.png`` (it may not exist:
    only some slides have one)."""
    return supplemental_masks_dir(cfg) / f"{image_id}.png"


def read_tiling_failures(cfg: Mapping) -> pd.DataFrame:
    """Stage 01's failure rows, every shard's file together."""
    return _read_failures(tiles_root(cfg).glob("failures*.csv"))


# ------------------------------------------------------------------------------ manifest and folds (02)


def manifest_path(cfg: Mapping) -> Path:
    return Path(cfg["paths"]["processed"]) / "manifest.csv"


def folds_path(cfg: Mapping) -> Path:
    return Path(cfg["paths"]["processed"]) / "folds.csv"


def stain_vectors_path(cfg: Mapping) -> Path:
    """Stage 02's slide stain vectors and clusters (``folds.group_by=stain_cluster`` only)."""
    return Path(cfg["paths"]["processed"]) / "stain_vectors.csv"


def read_manifest(cfg: Mapping) -> pd.DataFrame:
    """Stage 02's manifest, refused when it was built for another tiling than the config's."""
    path = manifest_path(cfg)
    if not path.is_file():
        raise MissingInput(path, run_stage_first("02"))
    manifest = pd.read_csv(path, dtype={"image_id": str, "parent_image_id": str})
    stale = set(manifest["tiling_key"]) - {tiling_key(cfg)}
    if stale:
        raise ValueError(f"manifest was built for tiling {sorted(stale)}, config gives {tiling_key(cfg)}: "
                         "re-run stages 01 and 02 with this config")
    return manifest


def read_training_table(cfg: Mapping) -> pd.DataFrame:
    """The manifest joined with its folds: one row per training slide, with ``fold`` (-1: train only)."""
    manifest = read_manifest(cfg)
    path = folds_path(cfg)
    if not path.is_file():
        raise MissingInput(path, run_stage_first("02"))
    folds = pd.read_csv(path, dtype={"image_id": str})[["slide_id", "fold"]]
    return manifest.merge(folds, on="slide_id", how="inner", validate="one_to_one")


# ------------------------------------------------------------------------------------ adapted encoders (02b)

ADAPTED_WEIGHTS_FILE = "model.safetensors"
ADAPTATION_RECORD_FILE = "record.json"


def adapted_encoder_dir(cfg: Mapping, name: str | None = None) -> Path:
    """``{processed}/encoders/{name}``: what stage 02b writes (``name``: ``adapt.name``)."""
    return Path(cfg["paths"]["processed"]) / "encoders" / (name or str(cfg["adapt"]["name"]))


def adapted_weights_path(cfg: Mapping, name: str | None = None) -> Path:
    """The adapted encoder's merged weights, which ``features.weights`` can name."""
    return adapted_encoder_dir(cfg, name) / ADAPTED_WEIGHTS_FILE


def uses_adapted_encoder(cfg: Mapping) -> bool:
    """Whether ``features.weights`` names this config's own stage-02b output (``features.weights: adapted``)."""
    weights = cfg["features"]["weights"]
    return bool(weights) and Path(weights).resolve() == adapted_weights_path(cfg).resolve()


def encoder_label_exposure(cfg: Mapping) -> dict | None:
    """When ``features.weights`` is an adapted encoder whose training read slide labels (stage 02b's
    ``supcon``/``finetune``): ``{"method", "label_slides", "holdout_slides"}`` from its record; else ``None``."""
    weights = cfg["features"]["weights"]
    if not weights:
        return None
    record_path = Path(weights).parent / ADAPTATION_RECORD_FILE
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    if not record.get("label_slides") or record.get("weights_sha256") != cached_file_checksum(weights):
        return None  # no labels read, or a record of other weights
    return {key: record[key] for key in ("method", "label_slides", "holdout_slides")}


# ------------------------------------------------------------------------------------- embeddings (03, 05)


def embeddings_root(cfg: Mapping) -> Path:
    """``{processed}/embeddings/{encoder}{variant}__{tiling key}``: encoders (with their weights and input
    size), TTA/stain variants and tilings never share a folder. Found without building the encoder."""
    return _embeddings_folder(cfg, float(cfg["features"]["stain_augmentation"]))


def test_embeddings_root(cfg: Mapping) -> Path:
    """Where stage 05 caches test features (under ``test/``): :func:`embeddings_root` named without the
    stain jitter variant, since test tiles are never stain-jittered (``features.stain_augmentation`` augments
    training tiles only; stain normalisation applies to test tiles too, and keeps its part of the name).
    With the jitter off, the same folder as the training features."""
    return _embeddings_folder(cfg, 0.0)


def variant_name(tta: str, stain_augmentation: float, stain_normalisation: str = "none",
                 stain_tta: bool = False, bn_adaptation: bool = False) -> str:
    """Suffix of the cache folder: features made with TTA, stain normalisation (``-macenko``, ``-reinhard``;
    ``-stta`` averaging the raw and normalised tile), stain jitter or batch-norm statistics adapted to each
    side's tiles (``-adabn``) never mix with plain ones."""
    parts = [] if tta == "none" else [f"tta-{tta}"]
    if stain_normalisation != "none":
        parts.append(stain_normalisation)
        parts += ["stta"] if stain_tta else []
    if stain_augmentation:
        parts.append(f"stain{stain_augmentation:g}")
    if bn_adaptation:
        parts.append("adabn")
    return "".join(f"-{p}" for p in parts)


def _embeddings_folder(cfg: Mapping, stain_augmentation: float) -> Path:
    features = cfg["features"]
    encoder = encoder_cache_name(features["encoder"], features["weights"], features["input_size"])
    variant = variant_name(features["tta"], stain_augmentation, str(features["stain_normalisation"]),
                           bool(features["stain_tta"]), bool(features["bn_adaptation"]))
    return Path(cfg["paths"]["processed"]) / "embeddings" / f"{encoder}{variant}__{tiling_key(cfg)}"


def test_features_fingerprint(cfg: Mapping) -> dict:
    """What shapes the test features stage 05 predicts from: their folder (:func:`test_embeddings_root`),
    and by name the encoder (weights, input size), the tiling key and the TTA variant it is named after
    (no stain jitter variant: test tiles are never jittered). Recorded beside each model's test predictions;
    stage 06 refuses predictions whose record differs."""
    features = cfg["features"]
    return {  # the named parts first: a mismatch is reported by the first key that differs
        "encoder": encoder_cache_name(features["encoder"], features["weights"], features["input_size"]),
        "tiling_key": tiling_key(cfg), "tta": str(features["tta"]), "embeddings": test_embeddings_root(cfg).name,
    }


def stain_reference_path(root: Path) -> Path:
    """The stain reference stage 03 fits beside the training embeddings under ``root`` (an
    :func:`embeddings_root`) when ``features.stain_normalisation`` is on; stage 04 copies it into the run."""
    return root / REFERENCE_FILE


def run_stain_reference(cfg: Mapping, experiment: str | None = None) -> Path:
    """``{runs}/{experiment}/stain_reference.json``: the stain reference the run's models were trained with
    (stage 04 copies it there; stage 05 normalises the test tiles with it)."""
    return run_dir(cfg, experiment) / REFERENCE_FILE


def embedding_path(root: Path, source: str, image_id: str) -> Path:
    """One slide's h5 under an embeddings root."""
    return root / source / f"{image_id}.h5"


def embedding_paths(root: Path, table: pd.DataFrame) -> dict[str, Path]:
    """``slide_id -> h5 path`` for a table with ``slide_id``, ``source`` and ``image_id`` columns."""
    return {row.slide_id: embedding_path(root, row.source, row.image_id) for row in table.itertuples()}


def embedding_attrs(cfg: Mapping, encoder_name: str, weights_id: str, input_size: int, slide_id: str,
                    **extra: object) -> dict:
    """The attributes every embeddings h5 records (stage 03 adds the tile folder's fingerprint, stage 05
    whether the image is a TMA, and ``stain_augmentation=0.0``: test tiles are never jittered; both add
    ``stain_reference``, the sha256 of the stain reference, when normalising): what made the features, so
    they are never mixed with others."""
    features = cfg["features"]
    stain = {} if features["stain_normalisation"] == "none" else {
        "stain_normalisation": str(features["stain_normalisation"]), "stain_tta": bool(features["stain_tta"])}
    return {
        "encoder": encoder_name, "weights_sha256": weights_id, "input_size": int(input_size),
        "tile_size": int(cfg["tiling"]["tile_size"]), "magnification": float(cfg["tiling"]["target_magnification"]),
        "slide_id": slide_id, "tiling_key": tiling_key(cfg), "tta": str(features["tta"]),
        "stain_augmentation": float(features["stain_augmentation"]), **stain, **extra,
    }


# ------------------------------------------------------------------------------------------ runs (04-06)


def run_dir(cfg: Mapping, experiment: str | None = None) -> Path:
    """``{runs}/{experiment}``: one experiment's trained models and reports (``experiment``: the config's)."""
    return Path(cfg["paths"]["runs"]) / str(experiment if experiment is not None else cfg["experiment"])


def predictions_dir(cfg: Mapping, experiment: str | None = None) -> Path:
    """``{predictions}/{experiment}``: what stages 05-06 write for one experiment (test predictions and their
    records, failures, resolved configs, the ensemble report). The run folder itself by default."""
    return Path(cfg["paths"]["predictions"]) / str(experiment if experiment is not None else cfg["experiment"])


def writable_problem(path: str | Path) -> str | None:
    """Why nothing can be written at ``path`` (None when it can): its nearest existing folder is not a
    folder, or refuses a new file (a read-only mount, permissions). Tried with a temporary file that is
    removed at once; nothing is created or left behind."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        handle, name = tempfile.mkstemp(dir=existing, prefix=".ubc-ocean-write-check-")
    except OSError as err:
        return f"{existing} is not writable ({err.strerror or err})"
    os.close(handle)
    os.unlink(name)
    return None


def require_writable(cfg: Mapping, *keys: str) -> None:
    """A ``ConfigError`` naming the folder and the ``paths.*`` key to change when a stage could not write
    under ``paths.{key}``: raised before any work, not after hours of embedding."""
    for key in keys:
        path = Path(cfg["paths"][key])
        problem = writable_problem(path)
        if problem:
            raise ConfigError(f"paths.{key} ({path}) cannot be written: {problem}; set paths.{key} to a writable "
                              "folder (e.g. under /kaggle/working on Kaggle)")


COMPLETION_FILE = "complete.json"
HEATMAPS_DIR = "heatmaps"  # scripts/heatmaps.py's pictures: the one sub-folder of a run that is not a model
PREDICTIONS_FILE = "test_predictions.csv"
PREDICTIONS_RECORD = "test_predictions.json"
_COMPLETION_FORMAT = 1


@dataclass(frozen=True)
class ModelDir:
    """One trained model's folder in a run: its checkpoints (one per fold x seed) and reports.

    Stage 04 trains a model in a temporary folder and renames it into place once whole, its
    ``complete.json`` written last; stages 05 and 06 use only folders that :meth:`is_complete`. Its test
    predictions live in ``outputs`` (``{predictions}/{experiment}/{model}``; the folder itself by default)."""

    path: Path
    outputs: Path | None = None

    @property
    def predictions_folder(self) -> Path:
        """Where stage 05 writes this model's test predictions and their records (stage 06 reads them)."""
        return self.outputs if self.outputs is not None else self.path

    @property
    def name(self) -> str:
        return self.path.name

    def checkpoint(self, fold: int, seed: int) -> Path:
        return self.path / f"fold{fold}_seed{seed}.pt"

    def checkpoints(self) -> list[Path]:
        return sorted(self.path.glob("fold*_seed*.pt"))

    @property
    def oof(self) -> Path:
        """Out-of-fold predictions: one row per validation slide and seed."""
        return self.path / "oof.csv"

    @property
    def curves(self) -> Path:
        return self.path / "curves.csv"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def outlier(self) -> Path:
        """The model's own "Other" threshold, calibrated on its OOF predictions."""
        return self.path / "outlier.json"

    @property
    def tumour_scorer(self) -> Path:
        """The tile tumour scorer and tile choice the model was trained with (only with ``tumour.scorer``;
        the completion record's ``tumour`` names it): stage 05 cuts test bags down with it."""
        return self.path / "tumour_scorer.json"

    @property
    def source_statistics(self) -> Path:
        """The training tiles' moments for CORAL alignment (only with ``mil.feature_alignment: coral``; the
        completion record's ``feature_alignment`` names it): stage 05 maps the test tiles onto them."""
        return self.path / "source_statistics.npz"

    def trained_extras(self, record: Mapping) -> list[Path]:
        """The files a model holds only when its completion ``record`` says it was trained with them: the
        tumour scorer (``tumour``) and the CORAL source statistics (``feature_alignment``)."""
        return [*([self.tumour_scorer] if record.get("tumour") else []),
                *([self.source_statistics] if record.get("feature_alignment") else [])]

    @property
    def harmonisation(self) -> Path:
        """With ``mil.harmonise`` on: per fold and batch, how far ComBat moved the training slides (for
        inspection; nothing downstream reads it)."""
        return self.path / "harmonisation.csv"

    # --------------------------------------------------------------------------------- completeness (04)

    @property
    def completion(self) -> Path:
        """The completion record, written last: the checkpoints' names, sizes and sha256, and what the
        model was trained on (``in_dim``, classes, embeddings folder, folds, seeds)."""
        return self.path / COMPLETION_FILE

    def write_completion(self, model: str, folds: Iterable[int], seeds: Iterable[int], **facts: object) -> dict:
        """Record this folder as a complete model once every fold x seed checkpoint, the OOF predictions,
        the metrics and the outlier threshold are in place (anything missing or extra raises)."""
        folds, seeds = [int(f) for f in folds], [int(s) for s in seeds]
        expected = sorted(self.checkpoint(f, s) for f in folds for s in seeds)
        found = self.checkpoints()
        if found != expected:
            raise RuntimeError(f"{self.path}: checkpoints {[p.name for p in found]} are not the folds x seeds "
                               f"{[p.name for p in expected]}")
        missing = [p.name for p in self._reports(facts) if not p.is_file()]
        if missing:
            raise RuntimeError(f"{self.path}: {missing} missing; the model is not complete")
        record = {
            "format": _COMPLETION_FORMAT, "model": model, **facts, "folds": folds, "seeds": seeds,
            "checkpoints": {p.name: {"size": p.stat().st_size, "sha256": file_checksum(p)} for p in found},
            "completed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(self.completion, json.dumps(record, indent=2))
        return record

    def read_completion(self) -> dict:
        """The completion record (``FileNotFoundError`` without one, ``ValueError`` when unreadable)."""
        record = json.loads(self.completion.read_text())
        if not isinstance(record, dict) or record.get("format") != _COMPLETION_FORMAT \
                or not isinstance(record.get("checkpoints"), dict) or not record["checkpoints"]:
            raise ValueError(f"{self.completion} is not a completion record of format {_COMPLETION_FORMAT}")
        return record

    def problem(self) -> str | None:
        """Why this folder is not a complete model (None when it is): no or unreadable completion record
        (a training that was interrupted, a folder some other program made), a listed checkpoint missing
        or of another size, a checkpoint not listed, or a missing report."""
        try:
            record = self.read_completion()
        except FileNotFoundError:
            return f"no {COMPLETION_FILE} (an unfinished training, or not a stage-04 model)"
        except (OSError, ValueError) as err:
            return f"unreadable {COMPLETION_FILE} ({err})"
        listed = record["checkpoints"]
        for name, entry in listed.items():
            path = self.path / name
            if not path.is_file():
                return f"checkpoint {name} listed in {COMPLETION_FILE} is missing"
            if not isinstance(entry, dict) or path.stat().st_size != entry.get("size"):
                return f"checkpoint {name} is not the one {COMPLETION_FILE} lists (size differs)"
        extra = [p.name for p in self.checkpoints() if p.name not in listed]
        if extra:
            return f"checkpoints {extra} are not listed in {COMPLETION_FILE}"
        missing = [p.name for p in self._reports(record) if not p.is_file()]
        return f"{missing} missing" if missing else None

    def _reports(self, record: Mapping) -> list[Path]:
        """The files a complete model holds besides its checkpoints (and :meth:`trained_extras`)."""
        return [self.oof, self.metrics, self.outlier, *self.trained_extras(record)]

    def is_complete(self) -> bool:
        return self.problem() is None

    # ---------------------------------------------------------------------------- test predictions (05)

    def predictions(self, shard: str | None) -> Path:
        """This shard's test predictions (files of another sharding layout are removed as stale)."""
        return shard_output(self.predictions_folder, PREDICTIONS_FILE, shard)

    def predictions_record(self, shard: str | None) -> Path:
        """The record beside this shard's test predictions: the checkpoints (sha256) and the test features
        (:func:`test_features_fingerprint`) they were made from. Another layout's records are removed."""
        return shard_output(self.predictions_folder, PREDICTIONS_RECORD, shard)

    def write_predictions_record(self, shard: str | None, checkpoints: Mapping[str, str], features: Mapping) -> Path:
        path = self.predictions_record(shard)
        record = {"model": self.name, "checkpoints": dict(sorted(checkpoints.items())), "features": dict(features)}
        return atomic_write_text(path, json.dumps(record, indent=2))

    def test_prediction_files(self) -> list[Path]:
        """Stage 05's test predictions of this model, one file per shard, sorted."""
        return sorted(self.predictions_folder.glob("test_predictions*.csv"))

    def require_test_predictions(self) -> list[Path]:
        """:meth:`test_prediction_files`, or a :class:`~ubc_ocean.io_utils.MissingInput` naming the folder and
        stage 05 when it holds none."""
        paths = self.test_prediction_files()
        if not paths:
            raise MissingInput(self.predictions_folder, run_stage_first("05"), problem="holds no test predictions")
        return paths

    def stale_predictions(self, features: Mapping | None) -> str | None:
        """Why this model's test predictions may not be used (None when they may): a file without its record,
        one made from other checkpoints than the completion record lists (retrained after stage 05), or from
        test features other than ``features`` (the current config's). With ``features`` None (another
        experiment's model, whose config stage 06 does not have), the test features must come from the encoder
        and tiling the model was trained on (its completion record). No predictions at all are a
        :class:`~ubc_ocean.io_utils.MissingInput` (:meth:`require_test_predictions`)."""
        paths = self.require_test_predictions()
        completion = self.read_completion()
        current = {name: entry.get("sha256") for name, entry in completion["checkpoints"].items()}
        for path in paths:
            record_path = path.with_suffix(".json")
            try:
                record = json.loads(record_path.read_text())
            except FileNotFoundError:
                return f"{path.name} has no record of the checkpoints it was made from ({record_path.name})"
            except (OSError, ValueError) as err:
                return f"{record_path.name} is unreadable ({err})"
            if not isinstance(record, dict) or record.get("checkpoints") != current:
                return f"{path.name} was made from other checkpoints than the current ones (retrained after stage 05)"
            made_from = record.get("features") if isinstance(record.get("features"), dict) else {}
            if features is None:
                trained = str(completion.get("embeddings", ""))
                encoder, tiling = str(made_from.get("encoder")), str(made_from.get("tiling_key"))
                if not (trained.startswith(encoder) and trained.endswith(f"__{tiling}")):
                    return (f"{path.name} was made from test features of encoder {encoder} and tiling {tiling}, "
                            f"the model was trained on {trained}")
                continue
            differ = [key for key in features if made_from.get(key) != features[key]]
            if differ:
                key = differ[0]
                return (f"{path.name} was made from test features with {key} {made_from.get(key)!r}, "
                        f"the config gives {features[key]!r}")
        return None

    def read_oof(self) -> pd.DataFrame:
        if not self.oof.is_file():
            raise MissingInput(self.oof, run_stage_first("04"))
        return pd.read_csv(self.oof, dtype={"image_id": str})

    def read_test_predictions(self) -> pd.DataFrame:
        """All shards of this model's test predictions, as one table (an id predicted twice is an error)."""
        paths = self.require_test_predictions()
        frame = pd.concat([pd.read_csv(p, dtype={"image_id": str}) for p in paths], ignore_index=True)
        repeated = frame["image_id"][frame["image_id"].duplicated()].unique().tolist()
        if repeated:
            raise ValueError(f"{self.predictions_folder}: image ids predicted more than once across "
                             f"{[p.name for p in paths]}: {repeated[:5]} (rerun stage 05 with one sharding)")
        return frame


def model_dir(cfg: Mapping, name: str, experiment: str | None = None) -> ModelDir:
    """One model of the config's experiment (or of ``experiment``), its test predictions under
    ``paths.predictions``."""
    return ModelDir(run_dir(cfg, experiment) / name, predictions_dir(cfg, experiment) / name)


def model_folders(cfg: Mapping, experiment: str | None = None) -> list[ModelDir]:
    """Every visible sub-folder of the run, complete model or not (``.tmp-*`` trainings are hidden), but
    the pictures' folder (:data:`HEATMAPS_DIR`)."""
    run = run_dir(cfg, experiment)
    if not run.is_dir():
        return []
    return [model_dir(cfg, p.name, experiment) for p in sorted(run.iterdir())
            if p.is_dir() and not p.name.startswith(".") and p.name != HEATMAPS_DIR]


def trained_models(cfg: Mapping, experiment: str | None = None) -> list[str]:
    """Names of the run's complete models (:meth:`ModelDir.is_complete`), sorted."""
    return [folder.name for folder in model_folders(cfg, experiment) if folder.is_complete()]


def chosen_models(cfg: Mapping, experiment: str | None = None) -> list[str]:
    """The models stages 05 and 06 use: ``inference.models``, each of which must be complete (else a
    ``ConfigError`` naming it and why), or else every complete model of the run, the other folders
    skipped with a warning each. May be empty. For another ``experiment`` than the config's (stage 06's
    ``submit.experiments``), every complete model of that run: ``inference.models`` names the config's own."""
    own = experiment is None or experiment == str(cfg["experiment"])
    chosen = cfg["inference"]["models"] if own else None
    if chosen:
        for name in chosen:
            problem = model_dir(cfg, name).problem() if model_dir(cfg, name).path.is_dir() else "no such folder"
            if problem:
                raise ConfigError(f"inference.models names {name!r}, which is not a complete model in "
                                  f"{run_dir(cfg)}: {problem}; run stage 04 for it or leave it out")
        return list(chosen)
    found = []
    for folder in model_folders(cfg, experiment):
        problem = folder.problem()
        if problem:
            log.warning("skipping %s: not a complete model: %s", folder.path, problem)
        else:
            found.append(folder.name)
    return found


def required_models(cfg: Mapping) -> list[str]:
    """:func:`chosen_models`, which must not be empty: else a :class:`~ubc_ocean.io_utils.MissingInput`
    naming the run folder and stage 04."""
    models = chosen_models(cfg)
    if not models:
        raise MissingInput(run_dir(cfg), run_stage_first("04"), problem="holds no complete trained model")
    return models


def ensemble_report_path(cfg: Mapping) -> Path:
    return predictions_dir(cfg) / "ensemble.json"


def submission_path(cfg: Mapping) -> Path:
    return Path(cfg["paths"]["submissions"]) / f"{cfg['submit']['name']}.csv"


def _read_failures(paths: Iterable[Path]) -> pd.DataFrame:
    frames = [pd.read_csv(path) for path in sorted(paths)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(FailureLog.columns))


# ------------------------------------------------------------------------------- pictures of a run (viz)


def loco_path(cfg: Mapping) -> Path:
    """Leave-one-class-out AUROC table (``scripts/eval_leave_one_class_out.py``)."""
    return run_dir(cfg) / "loco_auroc.csv"


def loco_scores_path(cfg: Mapping) -> Path:
    """The per-slide outlier scores behind :func:`loco_path`'s AUROCs (for ROC curves)."""
    return run_dir(cfg) / "loco_scores.csv"


def heatmap_path(cfg: Mapping, slide_id: str) -> Path:
    """``{run}/heatmaps/{source}_{image_id}.png`` (``scripts/heatmaps.py``)."""
    return run_dir(cfg) / HEATMAPS_DIR / f"{slide_id.replace('/', '_')}.png"


def report_path(cfg: Mapping) -> Path:
    """The run's self-contained HTML report (``scripts/report.py``)."""
    return run_dir(cfg) / "report.html"


def oof_checkpoints(model: ModelDir, fold: int | None) -> list[Path]:
    """The checkpoints that never trained on a slide of validation ``fold`` (every seed of that fold);
    every checkpoint for a slide outside the folds (``None``: a test slide; -1: train only)."""
    if fold is None or fold < 0:
        return model.checkpoints()
    return sorted(model.path.glob(f"fold{int(fold)}_seed*.pt"))


def find_slide(cfg: Mapping, slide: str) -> SlideFiles:
    """Where a training or test slide's pieces are, for a heatmap: ``slide`` is a slide id
    (``train/123``, ``test/456``, ``{external source}/{id}``) or a bare competition image id (training
    first, then test). Raises ``KeyError`` naming the slide when neither stage 02 nor test.csv lists it."""
    source, _, image_id = slide.rpartition("/")
    table = read_training_table(cfg)
    found = table[(table["image_id"] == image_id) & ((table["source"] == source) if source else
                                                     (table["source"] == TRAIN))]
    if len(found):
        row = found.iloc[0]
        tiles = slide_tiles_dir(cfg, row.source, image_id)
        facts = read_slide_info(tiles)
        if "path" not in facts:
            raise KeyError(f"{row.slide_id}: a bag of pre-cut patches has no slide to draw a heatmap on")
        thumbnail = raw_path(cfg, "train_thumbnails") / f"{image_id}_thumbnail.png" if row.source == TRAIN else None
        return SlideFiles(row.slide_id, str(row.label), Path(facts["path"]), thumbnail,
                          embedding_path(embeddings_root(cfg), row.source, image_id), int(facts["extent"]),
                          tiles=tiles, fold=int(row.fold))
    if source in ("", TEST):
        spec = next((s for s in competition_specs(cfg, TEST) if s.image_id == image_id), None)
        if spec is not None:
            h5 = embedding_path(test_embeddings_root(cfg), TEST, image_id)
            if not h5.is_file():
                raise MissingInput(h5, run_stage_first("05"), problem=f"(test embeddings of {spec.slide_id}) not found")
            with h5py.File(h5, "r") as handle:
                attrs = dict(handle.attrs)
            native = native_magnification(is_tma=bool(attrs["is_tma"]), slides_cfg=cfg["slides"])
            extent = max(1, round(int(attrs["tile_size"]) * native / float(attrs["magnification"])))
            return SlideFiles(spec.slide_id, None, spec.path, spec.thumbnail, h5, extent)
    raise KeyError(f"slide {slide!r} is neither in the training manifest nor in test.csv")


# ------------------------------------------------------------------------------------------- benchmark


def benchmark_dir(cfg: Mapping) -> Path:
    """``{runs}/{experiment}``: the benchmark's results; its configurations run as other experiments
    (:func:`benchmark_experiment`)."""
    return run_dir(cfg)


def benchmark_experiment(cfg: Mapping, name: str) -> str:
    """The experiment a benchmark configuration trains and predicts as: ``{experiment}-{name}``."""
    return f"{cfg['experiment']}-{name}"


def benchmark_grouped_experiment(cfg: Mapping, name: str) -> str:
    """The experiment a benchmark configuration trains as on grouped folds (``benchmark.grouped_folds``)."""
    return f"{benchmark_experiment(cfg, name)}-grouped"


def benchmark_configuration_dir(cfg: Mapping, name: str) -> Path:
    """``{runs}/{experiment}/configurations/{name}``: one configuration's scored test images and log."""
    return benchmark_dir(cfg) / "configurations" / name
