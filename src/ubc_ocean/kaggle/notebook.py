"""The bundle's ``submission.ipynb``: the whole Kaggle submission, with the internet off.

It finds the bundle (the folder holding a ``MANIFEST.json`` of kind ``ubc-ocean-kaggle-bundle``) and the
competition data (the folder holding ``test.csv`` beside ``test_images/``) under the input root by content,
never by name, installs the bundle's wheels with ``pip install --no-index --find-links``, runs stage 05 per
experiment and stage 06 (:mod:`ubc_ocean.kaggle.runner`), and checks ``submission.csv`` against ``test.csv``.
Environment variables move its folders for a rehearsal: ``UBC_OCEAN_INPUT`` (default ``/kaggle/input``) and
``UBC_OCEAN_WORKING`` (default ``/kaggle/working``). It holds no ids, counts or dataset names.
"""

from __future__ import annotations

INTRO = """# UBC-OCEAN: offline submission

Made by `scripts/07_package_kaggle.py` of the `ubc_ocean` pipeline. Attach two inputs to this notebook, the
bundle (the dataset holding `MANIFEST.json`) and the competition data, turn the internet off, and run all:
the wheels install offline, stage 05 predicts the test images with each bundled experiment, stage 06
ensembles them and writes `/kaggle/working/submission.csv`. Nothing here names a dataset, an image id or a
count: the same notebook runs on the few test images shown while editing and on the full hidden set."""

FIND = '''import json
import os
import subprocess
import sys
import time
from pathlib import Path

INPUT = Path(os.environ.get("UBC_OCEAN_INPUT", "/kaggle/input"))
WORKING = Path(os.environ.get("UBC_OCEAN_WORKING", "/kaggle/working"))
BUNDLE_KIND = "ubc-ocean-kaggle-bundle"
START = time.monotonic()


def folders_holding(name, root=INPUT, depth=4):
    """Folders under root (at most depth levels down) that hold a file called name."""
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        if name in files:
            found.append(Path(folder))
        if len(Path(folder).relative_to(root).parts) >= depth:
            subfolders.clear()
        subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))
    return found


def the_one(name, what, test):
    found = [folder for folder in folders_holding(name) if test(folder)]
    if len(found) != 1:
        raise SystemExit(f"expected one {what} under {INPUT} (a folder holding {name}), found {len(found)}: "
                         f"{[str(f) for f in found]}; attach it to the notebook")
    return found[0]


def is_bundle(folder):
    try:
        return json.loads((folder / "MANIFEST.json").read_text()).get("kind") == BUNDLE_KIND
    except (OSError, ValueError):
        return False


BUNDLE = the_one("MANIFEST.json", "ubc_ocean bundle", is_bundle)
DATA = the_one("test.csv", "competition data folder", lambda folder: (folder / "test_images").is_dir())
WORKING.mkdir(parents=True, exist_ok=True)
MANIFEST = json.loads((BUNDLE / "MANIFEST.json").read_text())
print(f"bundle: {BUNDLE} (ubc_ocean {MANIFEST['package_version']}, experiments {list(MANIFEST['experiments'])})")
print(f"competition data: {DATA}")
print(f"outputs: {WORKING}")'''

INSTALL = '''def run(command):
    """Run a command, echo its output, stop the notebook if it fails."""
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(result.stdout)
    if result.returncode != 0:
        raise SystemExit(f"exit status {result.returncode}")


wheels = sorted(str(path) for path in (BUNDLE / "wheels").glob("*.whl"))
run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(BUNDLE / "wheels"),
     "--disable-pip-version-check", "--no-warn-script-location", *wheels])
import importlib

importlib.invalidate_caches()
import torch
import ubc_ocean
from ubc_ocean.device import visible_devices

print(f"ubc_ocean {ubc_ocean.__version__} from {ubc_ocean.__file__}; python {sys.version.split()[0]}, "
      f"torch {torch.__version__}, CUDA {torch.cuda.is_available()}; encoding on "
      f"{', '.join(str(device) for device in visible_devices())} (a GPU this torch build has no kernels for is "
      "left out)")'''

PREDICT = '''from ubc_ocean.kaggle.runner import run_bundle

submission = run_bundle(BUNDLE, DATA, WORKING)'''

CHECK = '''import pandas as pd

test = pd.read_csv(DATA / "test.csv", dtype={"image_id": str})
result = pd.read_csv(submission, dtype={"image_id": str})
labels = {"CC", "EC", "HGSC", "LGSC", "MC", "Other"}
assert list(result.columns) == ["image_id", "label"], list(result.columns)
assert sorted(result.image_id) == sorted(test.image_id), "the submission's ids are not test.csv's"
assert set(result.label) <= labels, set(result.label) - labels
print(f"{submission}: {len(result)} rows for {len(test)} test images in {time.monotonic() - START:.0f} s")
print(result.label.value_counts().to_string())
result.head()'''


def _cell(kind: str, source: str, index: int) -> dict:
    cell = {"cell_type": kind, "id": f"cell-{index}", "metadata": {}, "source": source.splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def submission_notebook() -> dict:
    """The notebook as nbformat 4 JSON (a plain dict)."""
    return {
        "cells": [_cell(kind, source, i) for i, (kind, source) in enumerate(
            [("markdown", INTRO), ("code", FIND), ("code", INSTALL), ("code", PREDICT), ("code", CHECK)])],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4, "nbformat_minor": 5,
    }
