#!/usr/bin/env python
"""Stage 04: cross-validated MIL training (every model in mil.models, every fold and seed): checkpoints, OOF
predictions, metrics and the outlier threshold."""

from ubc_ocean.cli import main
from ubc_ocean.mil.stage import run

if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
