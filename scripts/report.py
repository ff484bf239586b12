#!/usr/bin/env python
"""One self-contained HTML report of a trained run (images embedded): per model the OOF balanced accuracy
with a bootstrap interval, confusion matrix, per-class recall, WSI against TMA, reliability diagram and the
outlier score with its threshold (plus leave-one-class-out ROC curves when that run exists), then the
heatmaps of the worst OOF slides. Writes {run}/report.html. Needs stage 04."""

import argparse

from ubc_ocean.cli import main


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worst", type=int, default=3, help="worst OOF slides shown with heatmaps (default 3)")


if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.viz.report:run", __doc__, arguments=_arguments))
