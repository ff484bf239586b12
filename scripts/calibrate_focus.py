#!/usr/bin/env python
"""Choose tiling.min_blur_score for your slides: scores the tissue tiles of a seeded sample of training
slides (focus_calibration.slides) as scanned and after Gaussian defocus (focus_calibration.defocus_sigmas),
prints score quantiles and the fraction of tiles each candidate threshold keeps, and saves the per-tile
scores beside the tile store. Uses tiling.blur_metric."""

from ubc_ocean.cli import main

if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.tiling.focus_calibration:run", __doc__))
