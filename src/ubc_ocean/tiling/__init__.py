"""Stage 01: tissue detection, tile planning and cutting, the tile store and QC overlays."""
