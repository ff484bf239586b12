#!/usr/bin/env python
"""Stage 00: write a seeded, UBC-OCEAN-shaped synthetic raw folder plus two external sources."""
from ubc_ocean.cli import main
from ubc_ocean.synthetic import run

if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
