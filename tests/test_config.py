from pathlib import Path

import pytest
import yaml

from tests.builders import REPO
from ubc_ocean.cli import build_parser, config_from_args, main
from ubc_ocean.config import ConfigError, load_config, parse_override, save_config


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
    with pytest.raises(ConfigError, match=r"runtime\.shard: .*0 <= i < n"):
        load_config(None, ["runtime.shard=2/2"])
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
