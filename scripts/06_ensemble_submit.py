#!/usr/bin/env python
"""Stage 06: ensemble the models' OOF and test predictions, flag outliers as Other and write
submissions/<name>.csv."""

from ubc_ocean.cli import main
from ubc_ocean.submit.stage import run

if __name__ == "__main__":
    raise SystemExit(main(run, __doc__))
