#!/usr/bin/env python
"""Stage 01: tile training slides and external sources (PNG via pyvips, svs/tiff via openslide) into the keyed
tile store, with tile indexes, QC overlays and a failures list."""

from ubc_ocean.cli import main

if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.tiling.stage:run", __doc__))
