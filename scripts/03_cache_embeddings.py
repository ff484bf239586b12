#!/usr/bin/env python
"""Stage 03: embed every manifest slide's tiles with the configured encoder into per-slide h5 files (features,
coords, attrs)."""

from ubc_ocean.cli import main

if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.features.stage:run", __doc__))
