"""Stage 03: batched embedding of the stored tiles into the per-slide h5 cache (``ubc_ocean.embedding_cache``),
with the encoders of :mod:`ubc_ocean.encoders`."""
