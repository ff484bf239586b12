#!/usr/bin/env python
"""Stage 02: merge the competition's tile indexes with the external sources into one manifest with provenance,
and write the cross-validation folds."""

from ubc_ocean.cli import main

if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.external.stage:run", __doc__))
