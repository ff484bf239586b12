import re
from pathlib import Path

import pytest
import yaml

from tests.builders import REPO
from ubc_ocean.cli import build_parser, config_from_args, main
from ubc_ocean.config import ConfigError, load_config, parse_override, save_config, with_overrides


def test_defaults_load_and_paths_resolve(tmp_path):
    cfg = load_config(None, [f"paths.data_root={tmp_path}"])
    assert cfg.tiling.tile_size == 256
    assert cfg.paths.raw == str(tmp_path / "raw")
    assert Path(cfg.paths.hidden_test_labels) == tmp_path / "hidden" / "test_labels.csv"


def test_demo_layers_on_default_and_overrides_win():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["tiling.tile_size=96", "mil.seeds=[0,1]"])
    assert cfg.experiment == "demo"                      # demo.yaml
    assert cfg.features.encoder == "efficientnet_lite0"  # default.yaml (its base)
    assert cfg.tiling.tile_size == 96                    # override
    assert cfg.mil.seeds == [0, 1]
    assert cfg.get_path("external.sources")[0]["name"] == "synthetic_tiff"


@pytest.mark.parametrize(
    ("override", "named"),
    [("tiling.tile_siz=256", "tiling.tile_siz"), ("tilling.tile_size=1", "tilling"), ("nope=1", "nope"),
     ("tiling.tile_size.foo=1", "tiling.tile_size.foo"), ("features.weights.path=x.pth", "features.weights.path")],
)
def test_unknown_keys_are_named(override, named):
    with pytest.raises(ConfigError, match=f"unknown config key '{named}'"):
        load_config(None, [override])


def test_unknown_key_in_file_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tiling:\n  tile_sise: 128\n")
    with pytest.raises(ConfigError, match=r"'tiling.tile_sise'.*did you mean 'tile_size'"):
        load_config(path)


def test_a_renamed_key_is_read_as_its_new_name_with_a_warning(tmp_path, caplog):
    """folds.group_column became folds.group_by: the old key, in a file (a trained run's saved config), an
    override or a benchmark configuration, is read as the new one and says so."""
    path = tmp_path / "old.yaml"
    path.write_text("folds:\n  group_column: patient_id\n")
    renamed = "config key 'folds.group_column' was renamed 'folds.group_by'"
    with caplog.at_level("WARNING", logger="ubc_ocean.config"):
        assert load_config(path)["folds"]["group_by"] == "patient_id"
        assert load_config(None, ["folds.group_column=hospital"])["folds"]["group_by"] == "hospital"
        cfg = load_config(None, ["benchmark.configurations=[{name: a, overrides: [folds.group_column=hospital]}]"])
        assert with_overrides(cfg, cfg.benchmark.configurations[0].overrides)["folds"]["group_by"] == "hospital"
    assert caplog.text.count(renamed) == 3


def test_stain_clusters_cannot_be_fewer_than_the_folds():
    message = "folds.stain_clusters must be 0 or >= folds.n_splits (5) with folds.group_by=stain_cluster"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["folds.group_by=stain_cluster", "folds.stain_clusters=3"])
    assert load_config(None, ["folds.group_by=hospital", "folds.stain_clusters=3"]).folds.stain_clusters == 3


def test_mapping_key_cannot_be_set_to_a_scalar():
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(None, ["tiling=3"])


def test_free_form_mapping_accepts_any_model_name():
    cfg = load_config(None, ["mil.model_options={transmil: {hidden_dim: 64}}"])
    assert cfg.mil.model_options["transmil"]["hidden_dim"] == 64


def test_parse_override_types():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}
    assert parse_override("a=null") == {"a": None}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_save_config_round_trips(tmp_path):
    cfg = load_config(None, ["seed=7"])
    path = save_config(cfg, tmp_path)
    assert yaml.safe_load(path.read_text())["seed"] == 7


def test_cli_flags_map_to_runtime_keys():
    args = build_parser("x").parse_args(["--config", str(REPO / "configs/demo.yaml"), "--workers", "3",
                                         "--shard", "1/4", "tiling.tile_size=64"])
    cfg = config_from_args(args)
    assert (cfg.runtime.workers, cfg.runtime.shard, cfg.tiling.tile_size) == (3, "1/4", 64)


def test_cli_reports_misspelt_key(capsys):
    code = main(lambda cfg: None, "x", ["--config", str(REPO / "configs/demo.yaml"), "tiling.tyle_size=3"])
    assert code == 2
    assert "tiling.tyle_size" in capsys.readouterr().err


def test_free_form_mapping_merges_across_layers():
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      ["mil.model_options={abmil: {hidden_dim: 32}}", "mil.model_options.transmil.dropout=0.2"])
    assert cfg.mil.model_options["abmil"]["hidden_dim"] == 32
    assert cfg.mil.model_options["transmil"] == {"hidden_dim": 128, "dropout": 0.2}  # demo.yaml's value kept


def test_bad_shard_and_looping_base_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"runtime\.shard must be .*0 <= i < n.*got .2/2."):
        load_config(None, ["runtime.shard=2/2"])
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


# ------------------------------------------------------------------ the whole config is checked at load

BAD_VALUES = [
    ("mil.schedule=bogus", "mil.schedule must be one of cosine, onecycle; got 'bogus'"),
    ("submit.weighting=x", "submit.weighting must be one of equal, oof; got 'x'"),
    ("features.tta=x", "features.tta must be one of none, flips, dihedral; got 'x'"),
    ("features.precision=half", "features.precision must be one of auto, fp32, bf16, fp16; got 'half'"),
    ("mil.precision=fp8", "mil.precision must be one of auto, fp32, bf16, fp16; got 'fp8'"),
    ("tiling.tile_size=abc", "tiling.tile_size must be an integer >= 2; got 'abc'"),
    ("tiling.tile_size=-128", "tiling.tile_size must be an integer >= 2; got -128"),
    ("tiling.tile_size=1", "tiling.tile_size must be an integer >= 2; got 1"),
    ("tiling.tile_size=256.0", "tiling.tile_size must be an integer >= 2; got 256.0"),
    ("tiling.min_tissue_fraction=abc", "tiling.min_tissue_fraction must be a number in [0, 1]; got 'abc'"),
    ("tiling.min_tissue_fraction=1.5", "tiling.min_tissue_fraction must be a number in [0, 1]; got 1.5"),
    ("tiling.max_tiles_per_slide=-5", "tiling.max_tiles_per_slide must be an integer >= 0; got -5"),
    ("runtime.workers=two", "runtime.workers must be an integer >= 1; got 'two'"),
    ("runtime.workers=-2", "runtime.workers must be an integer >= 1; got -2"),
    ("mil.epochs=abc", "mil.epochs must be an integer >= 1; got 'abc'"),
    ("mil.epochs=-1", "mil.epochs must be an integer >= 1; got -1"),
    ("mil.lr=0", "mil.lr must be a number > 0; got 0"),
    ("mil.feature_dropout=1", "mil.feature_dropout must be a number in [0, 1); got 1"),
    ("mil.class_weighting=maybe", "mil.class_weighting must be true or false; got 'maybe'"),
    ("mil.seeds=[0, 0]", "mil.seeds must be a non-empty list of integers in [0, 999], without repeats; got [0, 0]"),
    ("mil.seeds=[]", "mil.seeds must be a non-empty list of integers in [0, 999], without repeats; got []"),
    ("mil.models=[]", "mil.models must be a non-empty list of distinct model names; got []"),
    ("tiling.format=bmp", "tiling.format must be one of jpg, jpeg, png; got 'bmp'"),
    ("tiling.sampling=grid", "tiling.sampling must be one of random, stratified; got 'grid'"),
    ("tiling.blur_metric=fft", "tiling.blur_metric must be one of laplacian, wavelet; got 'fft'"),
    ("tiling.jpeg_quality=0", "tiling.jpeg_quality must be an integer in [1, 100]; got 0"),
    ("tiling.saturation_threshold=auto", "tiling.saturation_threshold must be otsu or a number in [0, 255]"),
    ("tiling.saturation_threshold=300", "tiling.saturation_threshold must be otsu or a number in [0, 255]; got 300"),
    ("tiling.black_value=-1", "tiling.black_value must be an integer in [0, 255]; got -1"),
    ("slides.wsi_magnification=0", "slides.wsi_magnification must be a number > 0; got 0"),
    ("folds.n_splits=1", "folds.n_splits must be an integer >= 2; got 1"),
    ("folds.group_by=' '", "folds.group_by must be null or a non-empty string; got ' '"),
    ("folds.stain_clusters=-1", "folds.stain_clusters must be an integer >= 0; got -1"),
    ("benchmark.grouped_folds=''", "benchmark.grouped_folds must be null or a non-empty string; got ''"),
    ("features.input_size=0", "features.input_size must be null or an integer >= 1; got 0"),
    ("features.weights=''", "features.weights must be null or a non-empty string; got ''"),
    ("features.stain_augmentation=2", "features.stain_augmentation must be a number in [0, 1]; got 2"),
    ("outliers.score=odin", "outliers.score must be one of max_prob, entropy, energy, mahalanobis, knn; got 'odin'"),
    ("outliers.knn_k=0", "outliers.knn_k must be an integer >= 1; got 0"),
    ("runtime.device=gpu", "runtime.device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
    ("runtime.log_level=LOUD", "runtime.log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("runtime.shard=4", "runtime.shard must be null or 'i/n' with 0 <= i < n (e.g. 0/4); got '4'"),
    ("inference.models=[]", "inference.models must be null or a non-empty list of strings, without repeats; got []"),
    ("seed=-1", "seed must be an integer in [0, 4294966]; got -1"),
    ("experiment=", "experiment must be a non-empty string; got ''"),
    ("data.classes=[CC]", "data.classes must be a list of 2 or more distinct non-empty class names; got ['CC']"),
    ("data.outlier_label=CC", "data.outlier_label must not be one of data.classes; got 'CC'"),
    ("synthetic.wsi_width=[500, 400]", "synthetic.wsi_width must be [low, high] integers with 64 <= low <= high"),
    ("synthetic.test_other=21", "synthetic.test_other must be <= synthetic.test_images (20); got 21"),
    ("focus_calibration.defocus_sigmas=[0]", "focus_calibration.defocus_sigmas must be a list of numbers > 0; got [0]"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_is_a_config_error_naming_key_rule_and_value(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_bad_value_in_a_config_file_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: " + str(REPO / "configs" / "demo.yaml") + "\nmil:\n  schedule: linear\n")
    with pytest.raises(ConfigError, match=r"^mil\.schedule must be one of cosine, onecycle; got 'linear'$"):
        load_config(path)
    path.write_text("submit:\n  name: on\n")  # YAML 1.1 reads a bare on as true: quoting is the fix
    with pytest.raises(ConfigError, match=r"^submit\.name must be a non-empty string \(quote it in YAML\); got True"):
        load_config(path)


def test_invalid_yaml_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'mil\.seeds=\[0' is not valid YAML: [^\n]*$"):
        load_config(None, ["mil.seeds=[0"])
    path = tmp_path / "broken.yaml"
    path.write_text("tiling:\n  tile_size: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML: [^\n]*$"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [("experiment=0123", "experiment", "0123"), ("submit.name=on", "submit.name", "on"),
     ("submit.name='quoted'", "submit.name", "quoted"), ("experiment=1e3", "experiment", "1e3"),
     ("paths.submissions=null", "paths.submissions", str(REPO / "null")),
     ("features.weights=null", "features.weights", None), ("features.weights=~", "features.weights", None),
     ("features.weights=hub", "features.weights", "hub"), ("folds.group_by=patient_id", "folds.group_by", "patient_id"),
     ("runtime.shard=1/4", "runtime.shard", "1/4"), ("runtime.device=cuda:1", "runtime.device", "cuda:1"),
     ("runtime.log_level=debug", "runtime.log_level", "debug"),
     ("mil.model_training.chowder.schedule=onecycle", "mil.model_training", {"chowder": {"schedule": "onecycle"}})],
)
def test_string_keys_keep_the_override_text(override, key, value):
    assert load_config(None, [override]).get_path(key) == value


def test_values_keep_their_loaded_types():
    cfg = load_config(None, ["slides.wsi_magnification=20", "tiling.target_magnification=40",
                             "tiling.saturation_threshold=30", "mil.lr=1e-3", "tiling.min_blur_score=1.5e+2"])
    assert type(cfg.slides.wsi_magnification) is int and cfg.slides.wsi_magnification == 20
    assert type(cfg.tiling.target_magnification) is int  # an int for a float key stays an int
    assert cfg.tiling.saturation_threshold == 30
    assert cfg.mil.lr == 0.001  # YAML 1.1 reads 1e-3 as a string: a float key takes the number it writes
    assert cfg.tiling.min_blur_score == 150.0
    # The tile folders are named by a hash of the tiling values: loading must not change any of them.
    defaults = yaml.safe_load((REPO / "src/ubc_ocean/config/defaults.yaml").read_text())
    loaded = load_config(None).to_dict()
    for section in ("tiling", "slides", "mil", "features", "synthetic"):
        assert loaded[section] == defaults[section]
        assert {k: type(v) for k, v in loaded[section].items()} == {k: type(v) for k, v in defaults[section].items()}


# --------------------------------------------------------------------------------- free-form sections


@pytest.mark.parametrize(
    ("sources", "message"),
    [("3", "external.sources must be a list of {name, kind, root, labels_csv, magnification}; got 3"),
     ("[x]", "external.sources[0] must be a mapping"),
     ("[{kind: slides}]", "external.sources[0].name is required"),
     ("[{name: train}]", "external.sources[0].name must be unique and not train or test; got 'train'"),
     ("[{name: test}]", "external.sources[0].name must be unique and not train or test; got 'test'"),
     ("[{name: a}, {name: a}]", "external.sources[1].name must be unique and not train or test; got 'a'"),
     ("[{name: a, knd: slides}]", "unknown config key 'external.sources[0].knd' (did you mean 'kind'?)"),
     ("[{name: a, kind: tiles}]", "external.sources[0].kind must be one of slides, patches; got 'tiles'"),
     ("[{name: a, magnification: 0}]", "external.sources[0].magnification must be null or a number > 0; got 0"),
     ("[{name: a, magnification: x}]", "external.sources[0].magnification must be null or a number > 0; got 'x'"),
     ("[{name: a, root: ''}]", "external.sources[0].root must be a non-empty string; got ''")],
)
def test_external_sources_are_checked_at_load(sources, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"external.sources={sources}"])
    assert str(caught.value).startswith(message)


def test_good_external_sources_load_as_written():
    sources = "[{name: a}, {name: b, kind: patches, root: r, labels_csv: l.csv, magnification: 20}]"
    cfg = load_config(None, [f"external.sources={sources}"])
    assert cfg.external.sources == [{"name": "a"}, {"name": "b", "kind": "patches", "root": "r",
                                                    "labels_csv": "l.csv", "magnification": 20}]


@pytest.mark.parametrize(
    ("override", "message"),
    [("mil.model_training={chowder: {lr: -1}}", "mil.model_training.chowder.lr must be a number > 0; got -1"),
     ("mil.model_training={chowder: {schedule: bogus}}",
      "mil.model_training.chowder.schedule must be one of cosine, onecycle; got 'bogus'"),
     ("mil.model_training.abmil.epochs=abc", "mil.model_training.abmil.epochs must be an integer >= 1; got 'abc'"),
     ("mil.model_training={chowder: {learning_rate: 0.1}}",
      "mil.model_training.chowder.learning_rate is not a per-model training key; choose among bag_standardise, "
      "balanced_sampling,"),
     ("mil.model_training={chowder: {epoch: 3}}",
      "mil.model_training.chowder.epoch is not a per-model training key (did you mean 'epochs'?)"),
     ("mil.model_training={abmil: {models: [x]}}", "mil.model_training.abmil.models is not a per-model training key"),
     ("mil.model_training={abmil: 3}", "mil.model_training.abmil must be a mapping of mil keys; got 3"),
     ("mil.model_options={transmil: 3}", "mil.model_options.transmil must be a mapping of constructor options")],
)
def test_per_model_sections_are_checked_at_load(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value).startswith(message)


def test_per_model_training_keys_load():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["mil.model_training.chowder.precision=fp32",
                                                         "mil.model_options.chowder.anything=1"])
    assert cfg.mil.model_training["chowder"] == {"precision": "fp32"}
    assert cfg.mil.model_options["chowder"]["anything"] == 1  # option names are the MIL registry's to check


# ----------------------------------------------------------------------------- every key has a rule


def test_every_default_key_has_a_rule_and_every_rule_a_key():
    from ubc_ocean.config import schema

    keys = [key for key, _ in schema.leaf_keys(schema.defaults())]
    assert len(keys) >= 100
    rules = {key: schema.rule_for(key, schema.defaults()) for key in keys}  # LookupError names a key without one
    assert all(rule.kind is not None for rule in rules.values())
    sections = {key.rsplit(".", 1)[0] for key in keys}
    for pattern in schema.RULES:
        assert pattern in keys or (pattern.endswith(".*") and pattern[:-2] in sections), f"stale rule {pattern}"


def test_a_key_without_a_rule_is_caught():
    from ubc_ocean.config import schema

    with pytest.raises(LookupError, match=r"'tiling\.new_knob' is in defaults.yaml but has no rule"):
        schema.rule_for("tiling.new_knob", {"tiling": {"new_knob": 3}})
    with pytest.raises(LookupError, match=r"'tiling\.tile_size' defaults to null: its rule must name its type"):
        schema.rule_for("tiling.tile_size", {"tiling": {"tile_size": None}})


@pytest.mark.parametrize("path", [None, *sorted((REPO / "configs").glob("*.yaml"))],
                         ids=lambda p: "defaults.yaml" if p is None else p.name)
def test_shipped_configs_load(path):
    load_config(path)


# ------------------------------------------------------------------------------------ command line


def test_overrides_may_follow_flags(tmp_path):
    seen = []
    argv = ["--config", str(REPO / "configs/demo.yaml"), "submit.name=x", "--log-level", "INFO",
            "submit.weighting=oof", "--workers", "3", f"paths.data_root={tmp_path}"]
    assert main(seen.append, "x", argv) == 0
    cfg = seen[0]
    assert (cfg.submit.name, cfg.submit.weighting, cfg.runtime.log_level) == ("x", "oof", "INFO")
    assert cfg.runtime.workers == 3


@pytest.mark.parametrize(("flags", "message"), [
    (["--workers", "-2"], "config error: runtime.workers must be an integer >= 1; got -2"),
    (["--workers", "two"], "config error: runtime.workers must be an integer >= 1; got 'two'"),
    (["--shard", "3/2"], "config error: runtime.shard must be null or 'i/n' with 0 <= i < n (e.g. 0/4); got '3/2'"),
])
def test_bad_flags_are_config_errors(tmp_path, capsys, flags, message):
    called = []
    argv = ["--config", str(REPO / "configs/demo.yaml"), f"paths.data_root={tmp_path}", *flags]
    assert main(called.append, "x", argv) == 2
    assert capsys.readouterr().err.splitlines() == [message] and not called


def test_missing_data_root_is_refused_unless_the_stage_creates_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    argv = ["--config", str(REPO / "configs/demo.yaml"), f"paths.data_root={missing}"]
    called = []
    assert main(called.append, "x", argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"config error: paths.data_root must be an existing folder (stage 00 creates the synthetic one); "
        f"got '{missing}'"]
    assert not called and not missing.exists()
    assert main(called.append, "x", argv, creates_data_root=True) == 0 and len(called) == 1


def _stage_script(script: str, *args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(REPO / "scripts" / script), "--config", "configs/demo.yaml", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize(
    ("script", "override", "starts"),
    [("04_train_cv.py", "mil.schedule=bogus", "mil.schedule must be one of cosine, onecycle; got 'bogus'"),
     ("04_train_cv.py", "tiling.tile_size=abc", "tiling.tile_size must be "),
     ("04_train_cv.py", "tiling.tile_size=-128", "tiling.tile_size must be "),
     ("04_train_cv.py", "tiling.min_tissue_fraction=abc", "tiling.min_tissue_fraction must be "),
     ("04_train_cv.py", "mil.epochs=-1", "mil.epochs must be "),
     ("01_tile_slides.py", "tiling.tile_size=-128", "tiling.tile_size must be ")],
)
def test_stage_script_refuses_a_bad_override_in_one_line_creating_nothing(tmp_path, script, override, starts):
    def outside() -> set:  # what stages could write outside data_root: paths.submissions is repo-relative
        return {*REPO.iterdir(), *(REPO / "submissions").glob("*")}

    before = outside()
    result = _stage_script(script, f"paths.data_root={tmp_path}", override)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]  # exactly one line
    assert result.stderr.startswith(f"config error: {starts}") and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no folder under data_root
    assert outside() == before


def test_stage_script_refuses_a_missing_data_root_without_creating_it(tmp_path):
    missing = tmp_path / "data"
    result = _stage_script("04_train_cv.py", f"paths.data_root={missing}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"config error: paths.data_root must be an existing folder (stage 00 "
                                          f"creates the synthetic one); got '{missing}'"]
    assert not missing.exists() and list(tmp_path.iterdir()) == []


def test_every_stage_script_names_an_importable_run():
    import importlib
    import re

    for script in sorted((REPO / "scripts").glob("*.py")):
        target = re.search(r'main\("([\w.]+):(\w+)"', script.read_text())
        if target:
            assert callable(getattr(importlib.import_module(target.group(1)), target.group(2))), script.name
