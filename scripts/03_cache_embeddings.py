#!/usr/bin/env python
"""Stage 03: embed every manifest slide's tiles with the configured encoder into per-slide h5 files (features,
coords, attrs)."""

from ubc_ocean.cli import main
from ubc_ocean.features.stage import run

if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
