"""The encoder library: presets and weights (a torch-free description of an encoder: its name, weights
identity and input size, which name the embeddings folder) and the registry that builds one with timm.

It sits below the layout module and the stages: ``presets`` and ``weights`` import neither torch nor timm;
``registry`` (``create_encoder``, ``encoder_out_dim``) does, and is imported only where models are built.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Encoder", "WeightsMismatchError", "create_encoder"]


def __getattr__(name: str) -> Any:
    """``Encoder``, ``WeightsMismatchError`` and ``create_encoder`` load torch and timm on first use only."""
    if name in __all__:
        from ubc_ocean.encoders import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
