"""The tiler's settings, read once from the config: the ``tiling`` section, the ``slides`` section and the
global ``seed``, as frozen typed values; their :attr:`TilingSettings.key` names the tile store's folder.

The config's schema checked every value when it loaded. Numbers keep the type the config gave them
(``target_magnification: 20`` stays the int 20, ``0.0`` stays a float): the key hashes them as the YAML
wrote them, so it is the same key as before these settings existed. Use ``float()`` where a float is written out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from ubc_ocean.config import ConfigError

# ``field(metadata=RUNTIME_ONLY)`` marks a setting that never changes a tile (a thread count, say): it is
# left out of the key, so changing it reuses the tiles already cut. Every setting today shapes the tiles.
RUNTIME_ONLY = {"key": False}
# ``field(metadata=keyed_when("name"))`` marks a setting that shapes the tiles only while setting ``name`` is
# on (nonzero): while it is off the setting stays out of the key, so adding such a feature (off by default)
# keeps every tile store cut before it.


def keyed_when(switch: str) -> dict:
    """Field metadata: the setting enters the key only while the setting ``switch`` is nonzero."""
    return {"key_when": switch}


@dataclass(frozen=True)
class SlideSettings:
    """The ``slides`` section: how a slide's scale, kind and reader are chosen."""

    wsi_magnification: float
    tma_magnification: float
    tma_max_side: int
    tma_square_tolerance: float
    in_memory_max_megapixels: float
    thumbnail_aspect_tolerance: float

    @property
    def in_memory_max_pixels(self) -> int:
        return round(float(self.in_memory_max_megapixels) * 1e6)


@dataclass(frozen=True)
class TilingSettings:
    """Every key of the ``tiling`` section (see ``config/defaults.yaml`` for their meaning), the ``slides``
    section and the global ``seed``."""

    target_magnification: float
    tile_size: int
    format: str
    jpeg_quality: int
    max_tiles_per_slide: int
    sampling: str
    mask_max_side: int
    min_tissue_fraction: float
    saturation_threshold: str | float  # 'otsu' or a number
    min_saturation: float
    black_value: int
    white_value: int
    morphology_radius: int
    max_hole_fraction: float
    blur_metric: str
    min_blur_score: float
    quality_fallback_tiles: int
    max_artefact_fraction: float
    dark_value: int
    synthetic_tmas_per_wsi: int = dataclasses.field(metadata=keyed_when("synthetic_tmas_per_wsi"))
    synthetic_tma_side: int = dataclasses.field(metadata=keyed_when("synthetic_tmas_per_wsi"))
    slides: SlideSettings
    seed: int

    @classmethod
    def from_config(cls, cfg: Mapping) -> TilingSettings:
        """The settings of ``cfg`` (a loaded config); a ``tiling`` or ``slides`` key that these settings
        lack is an error, never silently dropped."""
        slides = _typed(SlideSettings, cfg["slides"], "slides")
        return _typed(cls, {**cfg["tiling"], "slides": slides, "seed": cfg["seed"]}, "tiling")

    @property
    def key(self) -> str:
        """A short, readable folder name that changes whenever a setting that shapes the tiles changes:
        ``t{tile_size}_m{magnification}x_{hash of every keyed setting}``."""
        digest = hashlib.sha1(yaml.safe_dump(_keyed(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"t{int(self.tile_size)}_m{float(self.target_magnification):g}x_{digest}"


def _keyed(settings: Any) -> dict:
    """The settings that shape the tiles, as plain values (nested settings as mappings)."""
    values = {}
    for item in dataclasses.fields(settings):
        switch = item.metadata.get("key_when")
        if item.metadata.get("key", True) and (switch is None or getattr(settings, switch)):
            value = getattr(settings, item.name)
            values[item.name] = _keyed(value) if dataclasses.is_dataclass(value) else value
    return values


def _typed(cls: type, values: Mapping, section: str) -> Any:
    """``cls`` built from a config section whose values the schema checked when it loaded; a key the
    settings lack (or lack a value for) is an error, so no tiling key is silently left out of the key."""
    names = [item.name for item in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]} is not a setting of {cls.__name__}: add it to "
                          f"ubc_ocean/config/tiling.py (metadata=RUNTIME_ONLY if it never changes a tile)")
    missing = [name for name in names if name not in values]
    if missing:
        raise ConfigError(f"config lacks {section}.{missing[0]}")
    return cls(**{name: values[name] for name in names})
