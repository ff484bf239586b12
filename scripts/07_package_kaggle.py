#!/usr/bin/env python
"""Package trained experiments for a Kaggle code submission: one folder to upload as a dataset, holding this
package and the wheels Kaggle's image lacks (for its Python and platform), the complete models of each
experiment with the OOF tables stage 06 calibrates "Other" on, the encoder weights, a config with Kaggle's
paths per experiment, MANIFEST.json (size and sha256 of every file) and submission.ipynb. Prints the bundle's
size per part."""

from ubc_ocean.cli import main
from ubc_ocean.kaggle.wheels import DEFAULT_PLATFORM, DEFAULT_PYTHON


def options(parser):
    parser.add_argument("--out", required=True, help="the bundle folder to write (replaced once complete)")
    parser.add_argument("--experiments", help="comma-separated runs to bundle, one per encoder (default: experiment)")
    parser.add_argument("--python-version", default=DEFAULT_PYTHON, help="the target Python (default: %(default)s)")
    parser.add_argument("--platform", default=DEFAULT_PLATFORM, help="the target platform tag (default: %(default)s)")
    parser.add_argument("--wheels-from", help="a folder of wheels/sdists to take packages from instead of PyPI "
                        "(offline builds, tests)")
    parser.add_argument("--image-requirements", help="what the target image preinstalls (default: "
                        "kaggle/image-requirements.txt)")
    parser.add_argument("--no-time-budget", action="store_true", help="no time budget on Kaggle (default: "
                        "inference.time_budget_minutes, else 510 min: Kaggle's 9 h less set-up and a margin)")


if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.kaggle.bundle:run", __doc__, arguments=options))
