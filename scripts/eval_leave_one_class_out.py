#!/usr/bin/env python
"""Leave-one-class-out evaluation of the outlier scores: for each class, train without it and report how
well max_prob, entropy, energy, Mahalanobis and kNN separate it from known classes (AUROC). Needs the
embeddings and folds of stages 02-03; writes {run}/loco_auroc.csv."""

from ubc_ocean.cli import main

if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.mil.loco:run", __doc__))
