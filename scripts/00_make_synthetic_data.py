#!/usr/bin/env python
"""Stage 00: write a seeded, UBC-OCEAN-shaped synthetic raw folder plus two external sources."""
from ubc_ocean.cli import main

if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.synthetic:run", __doc__, creates_data_root=True))
