"""Tiling settings: read once from the config, complete, frozen, and the tile store's key derived from them."""

import dataclasses
import hashlib
from pathlib import Path

import pytest
import yaml

from ubc_ocean import tile_store
from ubc_ocean.config import DEFAULTS_FILE, ConfigError, as_plain, load_config
from ubc_ocean.config.tiling import SlideSettings, TilingSettings

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = yaml.safe_load(DEFAULTS_FILE.read_text())
_NESTED = ("slides", "seed")  # the settings that come from outside the tiling section


def _legacy_key(cfg) -> str:
    """The key as tile_store.tiling_key computed it from a hand-kept list of the tiling keys."""
    names = ("target_magnification", "tile_size", "format", "jpeg_quality", "max_tiles_per_slide", "sampling",
             "mask_max_side", "min_tissue_fraction", "saturation_threshold", "min_saturation", "black_value",
             "white_value", "morphology_radius", "max_hole_fraction", "blur_metric", "min_blur_score",
             "max_artefact_fraction", "dark_value", "quality_fallback_tiles")
    tiling = cfg["tiling"]
    fields = {name: tiling[name] for name in names}
    fields["slides"] = dict(cfg["slides"])
    fields["seed"] = cfg["seed"]
    digest = hashlib.sha1(yaml.safe_dump(fields, sort_keys=True).encode()).hexdigest()[:8]
    return f"t{int(tiling['tile_size'])}_m{float(tiling['target_magnification']):g}x_{digest}"


def test_demo_key_is_unchanged():
    # Was t128_m20x_f59a9daa until slides.thumbnail_aspect_tolerance: slides tiled before it, a stretched
    # thumbnail's misplaced tiles among them, are cut again.
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert TilingSettings.from_config(cfg).key == tile_store.tiling_key(cfg) == "t128_m20x_fbb7a3f5"


@pytest.mark.parametrize("overrides", [[], ["tiling.target_magnification=20.0"], ["tiling.min_tissue_fraction=1"],
                                       ["tiling.saturation_threshold=30"], ["tiling.saturation_threshold=30.5"],
                                       ["slides.in_memory_max_megapixels=0.5", "seed=7"]])
@pytest.mark.parametrize("config", [None, "default.yaml", "demo.yaml"])
def test_key_is_byte_identical_to_the_listed_one(config, overrides):
    """Ints stay ints and floats floats, so existing tile stores keep their folder."""
    cfg = load_config(REPO / "configs" / config if config else None, overrides)
    assert tile_store.tiling_key(cfg) == _legacy_key(cfg)


def test_settings_hold_every_tiling_and_slides_key_of_the_defaults():
    """A key added to defaults.yaml without a setting fails here (and from_config refuses it)."""
    names = [field.name for field in dataclasses.fields(TilingSettings)]
    assert set(names) - set(_NESTED) == set(DEFAULTS["tiling"])
    assert {field.name for field in dataclasses.fields(SlideSettings)} == set(DEFAULTS["slides"])
    cfg = as_plain(load_config(None))
    cfg["tiling"]["new_knob"] = 1
    with pytest.raises(ConfigError, match=r"tiling\.new_knob"):
        TilingSettings.from_config(cfg)
    cfg = as_plain(load_config(None))
    cfg["slides"]["new_knob"] = 1
    with pytest.raises(ConfigError, match=r"slides\.new_knob"):
        TilingSettings.from_config(cfg)
    del cfg["slides"]["new_knob"], cfg["tiling"]["dark_value"]
    with pytest.raises(ConfigError, match=r"tiling\.dark_value"):
        TilingSettings.from_config(cfg)


def test_settings_are_typed_and_frozen():
    settings = TilingSettings.from_config(load_config(None, ["tiling.tile_size=128", "tiling.format=png"]))
    assert settings.tile_size == 128 and isinstance(settings.tile_size, int)
    assert settings.format == "png" and settings.saturation_threshold == "otsu"
    assert settings.slides.in_memory_max_pixels == 64_000_000 and settings.seed == 42
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.tile_size = 64  # type: ignore[misc]
    for bad in ("tiling.tile_size=12.5", "tiling.tile_size=.inf", "tiling.min_blur_score=x",
                "tiling.jpeg_quality=true"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):  # refused when the config loads
            load_config(None, [bad])


def _changed(value):
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, int):
        return value + 1
    return value * 2 + 0.5


_DEFAULT = TilingSettings.from_config(load_config(None))


@pytest.mark.parametrize("item", [field for field in dataclasses.fields(TilingSettings) if field.name != "slides"],
                         ids=lambda field: field.name)
def test_changing_any_setting_changes_the_key(item):
    base = _DEFAULT  # a setting keyed only while its switch is on (keyed_when) is changed with the switch on
    switch = item.metadata.get("key_when")
    if switch and switch != item.name:
        base = dataclasses.replace(_DEFAULT, **{switch: 1})
    changed = dataclasses.replace(base, **{item.name: _changed(getattr(base, item.name))})
    assert changed.key != base.key


@pytest.mark.parametrize("name", [field.name for field in dataclasses.fields(SlideSettings)])
def test_changing_any_slides_setting_changes_the_key(name):
    slides = dataclasses.replace(_DEFAULT.slides, **{name: _changed(getattr(_DEFAULT.slides, name))})
    assert dataclasses.replace(_DEFAULT, slides=slides).key != _DEFAULT.key
