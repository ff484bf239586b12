#!/usr/bin/env python
"""Attention heatmaps of chosen slides for every trained model of a run, on the CPU, without tiling again:
the tiles' cached coordinates drawn over the slide's thumbnail (a TMA's image shrunk), each model's most and
least relevant tiles beside it. Writes {run}/heatmaps/{source}_{image_id}.png. Needs stages 01-04 (and 05
for test slides)."""

import argparse

from ubc_ocean.cli import main


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slides", required=True,
                        help="comma-separated image ids (training first, then test) or source/image_id")


if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.viz.report:heatmaps", __doc__, arguments=_arguments))
