"""The tiler's settings, read once from the config: the ``tiling`` section, the ``slides`` section and the
global ``seed``, as frozen typed values; their :attr:`TilingSettings.key` names the tile store's folder.

Numbers keep the type the config gave them (``target_magnification: 20`` stays the int 20, ``0.0`` stays a
float): the key hashes them as the YAML wrote them, so it is the same key as before these settings existed.
Use ``float()`` where a float is written out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

import yaml

from ubc_ocean.config import ConfigError

# ``field(metadata=RUNTIME_ONLY)`` marks a setting that never changes a tile (a thread count, say): it is
# left out of the key, so changing it reuses the tiles already cut. Every setting today shapes the tiles.
RUNTIME_ONLY = {"key": False}


@dataclass(frozen=True)
class SlideSettings:
    """The ``slides`` section: how a slide's scale, kind and reader are chosen."""

    wsi_magnification: float
    tma_magnification: float
    tma_max_side: int
    tma_square_tolerance: float
    in_memory_max_megapixels: float

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
    slides: SlideSettings
    seed: int

    @classmethod
    def from_config(cls, cfg: Mapping) -> TilingSettings:
        """The settings of ``cfg`` (a loaded config); a ``tiling`` or ``slides`` key that these settings
        lack is an error, never silently dropped."""
        slides = _typed(SlideSettings, cfg["slides"], "slides")
        return _typed(cls, {**cfg["tiling"], "slides": slides, "seed": cfg["seed"]}, "tiling",
                      extra=("slides", "seed"))

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
        if item.metadata.get("key", True):
            value = getattr(settings, item.name)
            values[item.name] = _keyed(value) if dataclasses.is_dataclass(value) else value
    return values


def _typed(cls: type, values: Mapping, section: str, extra: tuple[str, ...] = ()) -> Any:
    names = [item.name for item in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]} is not a setting of {cls.__name__}: add it to "
                          f"ubc_ocean/tiling/settings.py (metadata=RUNTIME_ONLY if it never changes a tile)")
    missing = [name for name in names if name not in values]
    if missing:
        raise ConfigError(f"config lacks {section}.{missing[0]}")
    hints = get_type_hints(cls)
    converted = {}
    for name in names:
        where = name if name in extra else f"{section}.{name}"
        converted[name] = _convert(values[name], hints[name], where)
    return cls(**converted)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` as ``hint`` says, keeping ints as ints where a float is asked (the key hashes them)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a {getattr(hint, '__name__', hint)}, got {value!r}")
    try:
        if hint is int:
            number = value if isinstance(value, int) else float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        if hint is float:
            return value if isinstance(value, int) else float(value)
        if hint is str:
            return str(value)
        if hint == str | float:
            return value if isinstance(value, str | int) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where} must be a {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value  # a nested settings object, already converted
