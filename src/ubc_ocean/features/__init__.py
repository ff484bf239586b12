"""Stage 03: patch encoders (registry), batched embedding, the per-slide h5 cache and fused streaming.

``Encoder``, ``WeightsMismatchError`` and ``create_encoder`` are loaded on first use: the torch-free parts
(``weights``, ``presets``, ``cache``) are imported by modules that must not load torch (the layout, stage 01).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Encoder", "WeightsMismatchError", "create_encoder"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ubc_ocean.features import encoders

        return getattr(encoders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
