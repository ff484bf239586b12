"""What every config key accepts, checked once when the config loads.

A key's type comes from its default in ``defaults.yaml`` (bool, int, float, str, or a list of one of
them); ``RULES`` adds what the default cannot tell: ranges, choices, null, and the free-form sections.
An int given for a float key is fine and stays an int (a hash of the tiling values names tile
folders). A bad value is a one-line :class:`ConfigError` naming the key, what it accepts and what it got.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ubc_ocean.parallel import parse_shard

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@functools.lru_cache(maxsize=1)
def defaults() -> dict:
    """``defaults.yaml`` as parsed (shared: copy it before changing it)."""
    with DEFAULTS_FILE.open() as handle:
        return yaml.safe_load(handle)


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


@dataclass(frozen=True)
class Rule:
    """What one key accepts. ``kind`` and ``item`` (a list's element type) default to the default's."""

    kind: type | None = None
    item: type | None = None
    low: float | None = None           # numbers, or a list's numbers: value >= low (> low if open_low)
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] = ()
    null: bool = False
    nonempty: bool = False             # strings and lists
    unique: bool = False               # lists
    size: int | None = None            # lists: exactly this many elements
    test: Callable[[Any], bool] | None = None  # a further test; ``accepts`` then says what passes
    accepts: str = ""
    section: Callable[[str, Any], Any] | None = None  # free-form sections: checks and raises itself

    def describe(self) -> str:
        if self.accepts:
            text = self.accepts
        elif self.kind is list:
            element = replace(self, kind=self.item, null=False, nonempty=False, size=None)
            head = f"a list of {self.size} " if self.size else "a non-empty list of " if self.nonempty else "a list of "
            bounds = element._bounds()
            text = head + _PLURALS[self.item] + (f" {bounds}" if bounds else "")
            text += ", without repeats" if self.unique else ""
        elif self.choices:
            text = f"one of {', '.join(self.choices)}"
        elif self.kind is str and self.nonempty:
            text = "a non-empty string"
        else:
            bounds = self._bounds()
            text = _NAMES[self.kind] + (f" {bounds}" if bounds else "")
        return f"null or {text}" if self.null else text

    def _bounds(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{_g(self.low)}, {_g(self.high)}]"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {_g(self.low)}"
        return f"<= {_g(self.high)}" if self.high is not None else ""


def _g(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def at_least(low: float, high: float | None = None, **more: Any) -> Rule:
    return Rule(low=low, high=high, **more)


def above(low: float, high: float | None = None, **more: Any) -> Rule:
    return Rule(low=low, high=high, open_low=True, **more)


def one_of(*choices: str, **more: Any) -> Rule:
    return Rule(choices=choices, **more)


FRACTION = Rule(low=0, high=1)
TEXT = Rule(nonempty=True)          # a non-empty string (type from the default)
TYPE = Rule()                        # the default's type, nothing more
LEVEL = Rule(low=0, high=255)        # an 8-bit channel value
PRECISION = one_of("auto", "fp32", "bf16", "fp16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ADAPT_METHODS = ("dino", "moco", "supcon", "finetune")
LABELLED_ADAPT_METHODS = ("supcon", "finetune")  # they read slide labels: label_holdout_folds stay unseen
_SCALE_RANGE = Rule(item=float, size=2, low=0, high=1, open_low=True, test=lambda v: v[0] <= v[1],
                    accepts="[low, high] with 0 < low <= high <= 1")
SEED_STRIDE = 1000  # stage 04 seeds each fit with seed * 1000 + mil.seeds[i]; NumPy needs it < 2**32


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shard_ok(text: str) -> bool:
    try:
        parse_shard(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------ free-form sections

EXTERNAL_KINDS = ("slides", "patches")
RESERVED_SOURCES = ("train", "test")
SOURCE_RULES = {
    "name": Rule(str, nonempty=True),
    "kind": one_of(*EXTERNAL_KINDS, kind=str),
    "root": Rule(str, nonempty=True),
    "labels_csv": Rule(str, nonempty=True),
    "magnification": above(0, kind=float, null=True),
}


def _sources(key: str, value: Any) -> Any:
    """``external.sources``: a list of ``{name, kind, root, labels_csv, magnification}``; ``name`` is
    required, unique and not a competition split; ``kind`` defaults to slides, ``root`` to the name."""
    if value is None:
        return value
    if not isinstance(value, list):
        raise ConfigError(f"{key} must be a list of {{name, kind, root, labels_csv, magnification}}; got {value!r}")
    names: set[str] = set()
    for position, entry in enumerate(value):
        where = f"{key}[{position}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping {{name, kind, root, labels_csv, magnification}}; "
                              f"got {entry!r}")
        for field in entry:
            if field not in SOURCE_RULES:
                raise unknown_key(f"{where}.{field}", SOURCE_RULES)
        if "name" not in entry:
            raise ConfigError(f"{where}.name is required (a source name other than {' and '.join(RESERVED_SOURCES)})")
        for field, rule in SOURCE_RULES.items():
            if field in entry:
                entry[field] = check_value(f"{where}.{field}", entry[field], rule)
        name = entry["name"]
        if name in RESERVED_SOURCES or name in names:
            why = "is a competition split" if name in RESERVED_SOURCES else "names an earlier source too"
            raise ConfigError(f"{where}.name must be unique and not {' or '.join(RESERVED_SOURCES)}; "
                              f"got {name!r} ({why})")
        names.add(name)
    return value


def _model_options(key: str, value: Any) -> Any:
    """``mil.model_options``: ``{model: {option: value}}``; the option names are the MIL registry's to check."""
    _model_mapping(key, value, "constructor options")
    return value


# mil keys that are not training settings, hence not overridable per model
NOT_PER_MODEL = ("models", "model_options", "model_training")


def _model_training(key: str, value: Any) -> Any:
    """``mil.model_training``: ``{model: {key: value}}`` with keys of the ``mil`` section (not
    ``models``/``model_options``/``model_training``), each value checked as ``mil.{key}``."""
    _model_mapping(key, value, "mil keys")
    mil = [name for name in compiled_rules() if name.startswith("mil.")]
    allowed = sorted(name[4:] for name in mil if name[4:] not in NOT_PER_MODEL)
    for model, settings in value.items():
        for name, setting in (settings or {}).items():
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{key}.{model}.{name} is not a per-model training key{hint}; "
                                  f"choose among {', '.join(allowed)}")
            settings[name] = check_value(f"{key}.{model}.{name}", setting, compiled_rules()[f"mil.{name}"])
    return value


def _model_mapping(key: str, value: Any, what: str) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping {{model: {{...}}}}; got {value!r}")
    for model, settings in value.items():
        if not isinstance(model, str):
            raise ConfigError(f"{key} must map model names to {what}; got the name {model!r}")
        if not (settings is None or isinstance(settings, Mapping)):
            raise ConfigError(f"{key}.{model} must be a mapping of {what}; got {settings!r}")


# Keys a benchmark configuration may not override: the data, the machine's paths and the benchmark are shared.
BENCHMARK_FIXED = ("experiment", "paths.", "synthetic.", "benchmark.", "submit.name")


def _configurations(key: str, value: Any) -> Any:
    """``benchmark.configurations``: a non-empty list of ``{name, overrides}``, names unique and usable in a
    folder name, overrides dotted ``KEY=VALUE`` strings that leave :data:`BENCHMARK_FIXED` alone. Whether
    each override's key and value are good is checked by loading the configuration (the benchmark does so
    for every configuration before any work)."""
    shape = "a non-empty list of {name, overrides: [KEY=VALUE, ...]}"
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} must be {shape}; got {value!r}")
    names: set[str] = set()
    for position, entry in enumerate(value):
        where = f"{key}[{position}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping {{name, overrides}}; got {entry!r}")
        for field in entry:
            if field not in ("name", "overrides"):
                raise unknown_key(f"{where}.{field}", ("name", "overrides"))
        name = entry.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in names:
            raise ConfigError(f"{where}.name must be a unique name of letters, digits, _ and -; got {name!r}")
        names.add(name)
        overrides = entry.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ConfigError(f"{where}.overrides must be a list of KEY=VALUE strings; got {overrides!r}")
        for override in overrides:
            dotted = override.split("=", 1)[0].strip()
            if any(dotted == fixed or (fixed.endswith(".") and dotted.startswith(fixed)) for fixed in BENCHMARK_FIXED):
                fixed_keys = ", ".join(f + "*" if f.endswith(".") else f for f in BENCHMARK_FIXED)
                raise ConfigError(f"{where}.overrides may not set {dotted} (shared by every configuration: "
                                  f"{fixed_keys}); got {override!r}")
        entry["overrides"] = overrides
    return value


# ------------------------------------------------------------------------------------------------- rules

RULES: dict[str, Rule] = {
    "experiment": TEXT,
    "seed": at_least(0, 2**32 // SEED_STRIDE - 1),
    "paths.*": TEXT,
    "runtime.workers": at_least(1),
    "runtime.shard": Rule(str, null=True, test=_shard_ok, accepts="'i/n' with 0 <= i < n (e.g. 0/4)"),
    "runtime.device": Rule(test=lambda v: v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None,
                           accepts="auto, cpu, cuda or cuda:N"),
    "runtime.log_level": Rule(test=lambda v: v.upper() in LOG_LEVELS,
                              accepts=f"one of {', '.join(LOG_LEVELS)} (any case)"),
    "data.*": TEXT,
    "data.classes": Rule(nonempty=True, unique=True, test=lambda v: len(v) >= 2 and all(x.strip() for x in v),
                         accepts="a list of 2 or more distinct non-empty class names"),
    "synthetic.seed": at_least(0),
    "synthetic.wsi_per_class": at_least(0),
    "synthetic.tma_per_class": at_least(0),
    "synthetic.test_images": at_least(0),
    "synthetic.test_tma_fraction": FRACTION,
    "synthetic.test_other": at_least(0),
    "synthetic.wsi_width": Rule(size=2, low=64, test=lambda v: v[0] <= v[1],
                                accepts="[low, high] integers with 64 <= low <= high"),
    "synthetic.wsi_height": Rule(size=2, low=64, test=lambda v: v[0] <= v[1],
                                 accepts="[low, high] integers with 64 <= low <= high"),
    "synthetic.tma_sides": at_least(64, nonempty=True),
    "synthetic.thumbnail_max_side": at_least(1),
    "synthetic.train_hospitals": at_least(1),
    "synthetic.external_tiff_slides": at_least(0),
    "synthetic.external_patch_slides": at_least(0),
    "synthetic.external_patches_per_slide": at_least(1),
    "synthetic.workers": at_least(1),
    "synthetic.train_images": at_least(0),
    "synthetic.class_proportions.*": at_least(0, kind=float),
    "synthetic.train_tma_fraction": FRACTION,
    "synthetic.test_class_mix": one_of("even", "proportional"),
    "synthetic.test_hospitals": at_least(1, 10),
    "synthetic.test_stain_shift": at_least(0, kind=float),
    "synthetic.test_other_kinds": one_of("fibrous", "stroma", "near_hgsc", kind=list, item=str, nonempty=True,
                                         unique=True, accepts="a non-empty list of fibrous, stroma, near_hgsc, "
                                                              "without repeats"),
    "synthetic.morphology_overlap": FRACTION,
    "synthetic.tumour_share": Rule(list, item=float, null=True, size=2, low=0, high=1, test=lambda v: v[0] <= v[1],
                                   accepts="null or [low, high] numbers with 0 <= low <= high <= 1"),
    "synthetic.blur_probability": FRACTION,
    "synthetic.blur_sigma": Rule(item=float, size=2, low=0, open_low=True, test=lambda v: v[0] <= v[1],
                                 accepts="[low, high] numbers with 0 < low <= high"),
    "synthetic.jpeg_probability": FRACTION,
    "synthetic.jpeg_quality": Rule(size=2, low=1, high=100, test=lambda v: v[0] <= v[1],
                                   accepts="[low, high] integers with 1 <= low <= high <= 100"),
    "synthetic.pen_probability": FRACTION,
    "synthetic.mask_fraction": FRACTION,
    "synthetic.test_resolution": at_least(1, kind=float),
    "synthetic.test_psf_sigma": at_least(0, kind=float),
    "synthetic.test_sharpen": at_least(0, kind=float),
    "synthetic.test_scanner_jpeg": at_least(0, 100),
    "synthetic.test_colour": at_least(0, kind=float),
    "synthetic.test_thickness": at_least(0, kind=float),
    "synthetic.test_morphology_drift": at_least(0, kind=float),
    "synthetic.train_hospital_column": TYPE,
    "slides.wsi_magnification": above(0, kind=float),
    "slides.tma_magnification": above(0, kind=float),
    "slides.tma_max_side": at_least(1),
    "slides.tma_square_tolerance": FRACTION,
    "slides.in_memory_max_megapixels": at_least(0, kind=float),
    "slides.thumbnail_aspect_tolerance": FRACTION,
    "tiling.target_magnification": above(0, kind=float),
    "tiling.tile_size": at_least(2),  # the wavelet focus score takes 2x2 blocks: a 1-px tile scores NaN
    "tiling.format": one_of("jpg", "jpeg", "png"),
    "tiling.jpeg_quality": at_least(1, 100),
    "tiling.max_tiles_per_slide": at_least(0),
    "tiling.sampling": one_of("random", "stratified"),
    "tiling.mask_max_side": at_least(1),
    "tiling.min_tissue_fraction": FRACTION,
    "tiling.saturation_threshold": Rule(object, test=lambda v: v == "otsu" or (_is_number(v) and 0 <= v <= 255),
                                        accepts="otsu or a number in [0, 255]"),
    "tiling.min_saturation": replace(LEVEL, kind=float),
    "tiling.black_value": LEVEL,
    "tiling.white_value": LEVEL,
    "tiling.morphology_radius": at_least(0),
    "tiling.max_hole_fraction": FRACTION,
    "tiling.blur_metric": one_of("laplacian", "wavelet"),
    "tiling.min_blur_score": at_least(0, kind=float),
    "tiling.quality_fallback_tiles": at_least(0),
    "tiling.max_artefact_fraction": FRACTION,
    "tiling.dark_value": LEVEL,
    "tiling.synthetic_tmas_per_wsi": at_least(0),
    "tiling.synthetic_tma_side": at_least(2),
    "focus_calibration.slides": at_least(1),
    "focus_calibration.defocus_sigmas": above(0, item=float),
    "focus_calibration.thresholds": at_least(0, item=float),
    "external.sources": Rule(list, section=_sources, accepts="a list of {name, kind, root, labels_csv, magnification}"),
    "folds.n_splits": at_least(2),
    "folds.group_by": Rule(str, null=True, nonempty=True),
    "folds.stain_clusters": at_least(0),
    "adapt.name": Rule(test=lambda v: re.fullmatch(r"[A-Za-z0-9_.-]+", v) is not None and v not in (".", ".."),
                       accepts="a folder name of letters, digits, _ . and -"),
    "adapt.base_weights": Rule(str, null=True, nonempty=True),
    "adapt.method": one_of(*ADAPT_METHODS),
    "adapt.trainable": one_of("lora", "last_blocks", "full"),
    "adapt.lora_rank": at_least(1),
    "adapt.lora_alpha": above(0),
    "adapt.lora_dropout": Rule(low=0, high=1, test=lambda v: v < 1, accepts="a number in [0, 1)"),
    "adapt.lora_last_stages": at_least(1),
    "adapt.last_blocks": at_least(1),
    "adapt.steps": at_least(1),
    "adapt.batch_size": at_least(2),
    "adapt.lr": above(0),
    "adapt.finetune_lr": above(0),
    "adapt.weight_decay": at_least(0),
    "adapt.warmup_steps": at_least(0),
    "adapt.max_tiles": at_least(0),
    "adapt.sources": Rule(list, item=str, unique=True, test=lambda v: all(x.strip() for x in v),
                          accepts="a list of distinct external source names"),
    "adapt.max_minutes": above(0, kind=float, null=True),
    "adapt.checkpoint_every": at_least(1),
    "adapt.log_every": at_least(1),
    "adapt.num_workers": at_least(0),
    "adapt.precision": PRECISION,
    "adapt.crop_scale": _SCALE_RANGE,
    "adapt.local_crops": at_least(0),
    "adapt.local_crop_size": at_least(8),
    "adapt.local_crop_scale": _SCALE_RANGE,
    "adapt.stain_jitter": FRACTION,
    "adapt.colour_jitter": FRACTION,
    "adapt.blur_probability": FRACTION,
    "adapt.jpeg_probability": FRACTION,
    "adapt.dino_out_dim": at_least(2),
    "adapt.dino_teacher_temp": above(0),
    "adapt.dino_warmup_teacher_temp": above(0),
    "adapt.dino_teacher_temp_warmup_steps": at_least(0),
    "adapt.dino_freeze_last_layer_steps": at_least(0),
    "adapt.dino_student_temp": above(0),
    "adapt.koleo_weight": at_least(0),
    "adapt.momentum": Rule(low=0, high=1, test=lambda v: v < 1, accepts="a number in [0, 1)"),
    "adapt.moco_temperature": above(0),
    "adapt.queue_size": at_least(0),
    "adapt.supcon_temperature": above(0),
    "adapt.supcon_prototypes": TYPE,
    "adapt.head_steps": at_least(0),
    "adapt.unfreeze_every": at_least(1),
    "adapt.lwf_weight": at_least(0),
    "adapt.validation_every": at_least(1),
    "adapt.patience": at_least(1),
    "adapt.validation_share": Rule(low=0, high=1, open_low=True, test=lambda v: v < 1, accepts="a number in (0, 1)"),
    "adapt.label_holdout_folds": at_least(0, nonempty=True, unique=True),
    "features.encoder": TEXT,
    "features.weights": Rule(str, null=True, nonempty=True),
    "features.input_size": at_least(1, kind=int, null=True),
    "features.batch_size": at_least(1),
    "features.num_workers": at_least(0),
    "features.precision": PRECISION,
    "features.tta": one_of("none", "flips", "dihedral"),
    "features.stain_augmentation": FRACTION,
    "features.stain_normalisation": one_of("none", "macenko", "reinhard"),
    "features.stain_tta": TYPE,
    "features.stain_reference_tiles": at_least(1),
    "features.bn_adaptation": TYPE,
    "features.bn_adaptation_tiles": at_least(2),
    "features.cpu_threads": at_least(0),
    "mil.models": Rule(nonempty=True, unique=True, test=lambda v: all(x.strip() for x in v),
                       accepts="a non-empty list of distinct model names"),
    "mil.model_options": Rule(dict, section=_model_options, accepts="a mapping {model: {option: value}}"),
    "mil.model_training": Rule(dict, section=_model_training, accepts="a mapping {model: {mil key: value}}"),
    "mil.seeds": at_least(0, SEED_STRIDE - 1, nonempty=True, unique=True),
    "mil.epochs": at_least(1),
    "mil.lr": above(0),
    "mil.weight_decay": at_least(0),
    "mil.max_instances": at_least(0),
    "mil.feature_dropout": Rule(low=0, high=1, test=lambda v: v < 1, accepts="a number in [0, 1)"),
    "mil.max_instances_predict": at_least(0),
    "mil.schedule": one_of("cosine", "onecycle"),
    "mil.class_weighting": TYPE,
    "mil.bag_standardise": TYPE,
    "mil.feature_alignment": one_of("none", "coral"),
    "mil.coral_eps": above(0),
    "mil.coral_by_kind": TYPE,
    "mil.coral_min_tiles": at_least(2),
    "mil.balanced_sampling": TYPE,
    "mil.epoch_selection": one_of("best_valid", "last"),
    "mil.patience": at_least(1),
    "mil.grad_clip": at_least(0),
    "mil.precision": PRECISION,
    "mil.harmonise": one_of("none", "combat"),
    "mil.harmonise_by": TEXT,
    "mil.harmonise_mean_only": TYPE,
    "tumour.scorer": TYPE,
    "tumour.mode": one_of("select", "weight"),
    "tumour.keep_fraction": above(0, 1),
    "tumour.min_tiles": at_least(1),
    "outliers.score": one_of("max_prob", "entropy", "energy", "mahalanobis", "knn"),
    "outliers.in_distribution_flag_rate": FRACTION,
    "outliers.knn_k": at_least(1),
    "outliers.per_type_thresholds": TYPE,
    "outliers.per_type_min_slides": at_least(1),
    "inference.models": Rule(list, item=str, null=True, nonempty=True, unique=True),
    "inference.decoders": Rule(object, test=lambda v: v == "auto" or (type(v) is int and v >= 1),
                               accepts="auto or an integer >= 1"),
    "inference.queue_depth": at_least(1),
    "inference.time_budget_minutes": above(0, kind=float, null=True),
    "inference.budget_reserve": Rule(low=0, high=1, test=lambda v: v < 1, accepts="a number in [0, 1)"),
    "inference.budget_min_tiles": at_least(1),
    "inference.provisional_submission": TYPE,
    "submit.name": TEXT,
    "submit.weighting": one_of("equal", "oof"),
    "submit.experiments": Rule(list, item=str, null=True, nonempty=True, unique=True,
                               test=lambda v: v is None or all(x.strip() and "/" not in x for x in v),
                               accepts="null or a non-empty list of distinct experiment names"),
    "benchmark.configurations": Rule(list, section=_configurations,
                                     accepts="a non-empty list of {name, overrides: [KEY=VALUE, ...]}"),
    "benchmark.baseline": Rule(str, null=True, nonempty=True),
    "benchmark.bootstrap": at_least(1),
    "benchmark.confidence": Rule(low=0, high=1, open_low=True, test=lambda v: v < 1, accepts="a number in (0, 1)"),
    "benchmark.seed": at_least(0, 2**32 - 1),
    "benchmark.resume": TYPE,
    "benchmark.grouped_folds": Rule(str, null=True, nonempty=True),
}

# Keys that were renamed within their section: the old name is read as the new one, with a warning (a trained
# run's saved config.yaml still loads; dropping it silently would draw other folds).
RENAMED = {"folds.group_column": "folds.group_by"}
STAIN_CLUSTER = "stain_cluster"  # folds.group_by: group by clusters of the slides' stain vectors (stage 02)


def _cross_checks(cfg: Mapping) -> None:
    """Rules that tie two keys together."""
    syn, data = cfg["synthetic"], cfg["data"]
    if syn["test_other"] > syn["test_images"]:
        raise ConfigError(f"synthetic.test_other must be <= synthetic.test_images ({syn['test_images']}); "
                          f"got {syn['test_other']!r}")
    bench = cfg["benchmark"]
    names = [entry["name"] for entry in bench["configurations"]]
    if bench["baseline"] is not None and bench["baseline"] not in names:
        raise ConfigError(f"benchmark.baseline must be null or one of the configurations' names ({', '.join(names)}); "
                          f"got {bench['baseline']!r}")
    if data["outlier_label"] in data["classes"]:
        raise ConfigError(f"data.outlier_label must not be one of data.classes; got {data['outlier_label']!r}")
    folds = cfg["folds"]
    if folds["group_by"] == STAIN_CLUSTER and 0 < folds["stain_clusters"] < folds["n_splits"]:
        raise ConfigError(f"folds.stain_clusters must be 0 or >= folds.n_splits ({folds['n_splits']}) with "
                          f"folds.group_by={STAIN_CLUSTER} (each fold validates whole clusters); "
                          f"got {folds['stain_clusters']!r}")
    features = cfg["features"]
    if features["stain_tta"] and features["stain_normalisation"] == "none":
        raise ConfigError("features.stain_tta averages the raw and the stain-normalised tile: it needs "
                          "features.stain_normalisation (macenko or reinhard); got none")
    adapt = cfg["adapt"]
    if adapt["method"] in LABELLED_ADAPT_METHODS:
        beyond = [fold for fold in adapt["label_holdout_folds"] if fold >= folds["n_splits"]]
        if beyond or len(adapt["label_holdout_folds"]) >= folds["n_splits"]:
            raise ConfigError(f"adapt.label_holdout_folds must name folds below folds.n_splits ({folds['n_splits']}) "
                              f"and leave some for training; got {adapt['label_holdout_folds']!r}")
    if adapt["method"] == "finetune" and adapt["trainable"] == "lora":
        raise ConfigError("adapt.method=finetune follows its own schedule (head, gradual unfreezing, full): set "
                          "adapt.trainable to full or last_blocks (the blocks phase 2 may unfreeze)")
    tiling = cfg["tiling"]
    if tiling["synthetic_tmas_per_wsi"] and tiling["synthetic_tma_side"] < tiling["tile_size"]:
        raise ConfigError(f"tiling.synthetic_tma_side must be >= tiling.tile_size ({tiling['tile_size']}) when "
                          f"tiling.synthetic_tmas_per_wsi is on; got {tiling['synthetic_tma_side']!r}")


# ---------------------------------------------------------------------------------------------- checking


def unknown_key(dotted: str, known: Iterator[str] | Mapping) -> ConfigError:
    leaf = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, [str(k) for k in known], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{dotted}'{hint}")


def leaf_keys(node: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every setting: sections are walked, free-form ({} default) ones are leaves."""
    for key, value in node.items():
        if isinstance(value, Mapping) and value:
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def rule_for(dotted: str, default_cfg: Mapping) -> Rule:
    """The key's rule with its types filled in from its default (a key without a rule is a bug here)."""
    rule = RULES.get(dotted) or RULES.get(dotted.rsplit(".", 1)[0] + ".*")
    if rule is None:
        raise LookupError(f"config key '{dotted}' is in defaults.yaml but has no rule in config/schema.py")
    node: Any = default_cfg
    for part in dotted.split("."):
        node = node[part]
    kind = rule.kind or (type(node) if node is not None else None)
    if kind is None:
        raise LookupError(f"config key '{dotted}' defaults to null: its rule must name its type")
    item = rule.item
    if kind is list and item is None and rule.section is None:
        if not node:
            raise LookupError(f"config key '{dotted}' defaults to []: its rule must name its element type")
        item = type(node[0])
    return replace(rule, kind=kind, item=item)


@functools.lru_cache(maxsize=1)
def compiled_rules() -> dict[str, Rule]:
    """Every key of ``defaults.yaml`` with its complete rule."""
    return {key: rule_for(key, defaults()) for key, _ in leaf_keys(defaults())}


def _per_model_key(dotted: str) -> str:
    """``mil.model_training.{model}.{key}`` -> ``mil.{key}`` (whose rule it follows); others unchanged."""
    parts = dotted.split(".")
    if len(parts) == 4 and parts[:2] == ["mil", "model_training"]:
        return f"mil.{parts[3]}"
    return dotted


def text_rule(dotted: str) -> Rule | None:
    """The rule of ``dotted`` when it takes a string (an override then keeps its raw text), else None."""
    rule = compiled_rules().get(_per_model_key(dotted))
    return rule if rule is not None and rule.kind is str else None


def _number(value: Any) -> Any:
    """A YAML 1.1 loader reads ``1e-3`` (no dot) as a string: such a string becomes the float it writes."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _typed(value: Any, kind: type, rule: Rule) -> bool:
    if kind is object:
        return True
    if kind is float:
        return _is_number(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str) and not (rule.nonempty and not value.strip())
    return isinstance(value, kind)


def _in_range(value: Any, rule: Rule) -> bool:
    if rule.choices and value not in rule.choices:
        return False
    if rule.low is not None and (value <= rule.low if rule.open_low else value < rule.low):
        return False
    return rule.high is None or value <= rule.high


def check_value(key: str, value: Any, rule: Rule) -> Any:
    """``value`` if ``rule`` accepts it (a numeric string for a float becomes that float), else a ConfigError."""
    if rule.section is not None:
        return rule.section(key, value)
    if value is None and rule.null:
        return value
    if rule.kind is float:
        value = _number(value)
    ok = _typed(value, rule.kind, rule)
    if ok and rule.kind is list:
        if rule.item is float:
            value = [_number(v) for v in value]
        ok = (all(_typed(v, rule.item, rule) and _in_range(v, rule) for v in value)
              and not (rule.nonempty and not value) and (rule.size is None or len(value) == rule.size)
              and not (rule.unique and len(set(value)) != len(value)))
    elif ok and rule.kind is not object:
        ok = _in_range(value, rule)
    if ok and rule.test is not None:
        ok = bool(rule.test(value))
    if not ok:
        quote = " (quote it in YAML)" if rule.kind is str and isinstance(value, (bool, int, float)) else ""
        raise ConfigError(f"{key} must be {rule.describe()}{quote}; got {value!r}")
    return value


def check_config(cfg: dict) -> None:
    """Check every key of a merged config in place (see :func:`check_value`), then the cross-key rules."""
    for key, rule in compiled_rules().items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = check_value(key, node[leaf], rule)
    _cross_checks(cfg)
