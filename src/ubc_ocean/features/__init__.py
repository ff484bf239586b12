"""Stage 03: patch encoders (registry), batched embedding, the per-slide h5 cache and fused streaming."""

from ubc_ocean.features.encoders import Encoder, WeightsMismatchError, create_encoder

__all__ = ["Encoder", "WeightsMismatchError", "create_encoder"]
