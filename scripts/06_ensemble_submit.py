#!/usr/bin/env python
"""Stage 06: ensemble the models' OOF and test predictions, flag outliers as Other and write
submissions/<name>.csv."""

from ubc_ocean.cli import main

if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.submit.stage:run", __doc__))
