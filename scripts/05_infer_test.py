#!/usr/bin/env python
"""Stage 05: tile and embed each raw test image in one streaming pass (no tiles written) and predict it with
every trained model."""

from ubc_ocean.cli import main

if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.inference.stage:run", __doc__))
