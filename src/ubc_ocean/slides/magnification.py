"""Scale harmonisation: which magnification a slide was scanned at, and WSI-vs-TMA by size."""

from __future__ import annotations

from collections.abc import Mapping


def is_tma_by_size(width: int, height: int, max_side: int, square_tolerance: float) -> bool:
    """UBC-OCEAN TMAs are square and small (2964 or 3388 px); WSIs are large and oblong."""
    longest = max(width, height)
    return longest <= max_side and abs(width - height) / longest <= square_tolerance


def mpp_to_magnification(mpp: float) -> float:
    """Microns per pixel to objective power, with the usual convention 0.5 um/px = 20x."""
    return 10.0 / mpp


def native_magnification(
    *,
    is_tma: bool | None = None,
    mpp: float | None = None,
    objective_power: float | None = None,
    source_magnification: float | None = None,
    slides_cfg: Mapping | None = None,
) -> float:
    """The magnification a slide's level 0 was scanned at, from the best evidence available.

    Order: the slide's own mpp, its objective power, a per-source magnification from config, then the
    competition's rule (TMA 40x, WSI 20x). Raises ``ValueError`` when nothing applies.
    """
    if mpp:
        return mpp_to_magnification(float(mpp))
    if objective_power:
        return float(objective_power)
    if source_magnification:
        return float(source_magnification)
    if slides_cfg is not None and is_tma is not None:
        return float(slides_cfg["tma_magnification"] if is_tma else slides_cfg["wsi_magnification"])
    raise ValueError(
        "no magnification: the slide has no mpp or objective power and its source sets none "
        "(set `magnification` on its external.sources entry)"
    )
