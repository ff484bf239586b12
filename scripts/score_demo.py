#!/usr/bin/env python
"""Print the demo's figures: OOF balanced accuracy, the synthetic test set's balanced accuracy (scored
against the hidden labels file that no stage reads) and the submission's path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ubc_ocean import layout
from ubc_ocean.cli import build_parser, config_error, config_from_args, require_data_root
from ubc_ocean.config import ConfigError
from ubc_ocean.submit.score import score_submission


def main() -> int:
    try:
        cfg = config_from_args(build_parser(__doc__).parse_intermixed_args())
        require_data_root(cfg)
    except ConfigError as err:
        return config_error(err)
    report = json.loads(layout.ensemble_report_path(cfg).read_text())
    labels = Path(cfg.paths.hidden_test_labels)
    if not labels.is_file():
        print(f"no hidden labels at {labels}: only synthetic data can be scored", file=sys.stderr)
        return 2
    test = score_submission(layout.submission_path(cfg), labels)
    for name, value in report["oof_balanced_accuracy_per_model"].items():
        print(f"OOF balanced accuracy ({name}): {value:.3f}")
    print(f"OOF balanced accuracy (ensemble): {report['oof_balanced_accuracy']:.3f}")
    recalls = ", ".join(f"{k} {v:.2f}" for k, v in test["per_class_recall"].items())
    print(f"test balanced accuracy (synthetic, hidden labels): {test['balanced_accuracy']:.3f}  [{recalls}]")
    print(f"submission: {layout.submission_path(cfg)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
