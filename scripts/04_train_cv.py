#!/usr/bin/env python
"""Stage 04: cross-validated MIL training (every model in mil.models, every fold and seed): checkpoints, OOF
predictions, metrics and the outlier threshold."""

from ubc_ocean.cli import main

if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.mil.stage:run", __doc__))
