"""Stage 05: fused tiling + embedding of raw test images and per-model test predictions."""
