#!/usr/bin/env python
"""Rehearse a Kaggle submission: run a bundle's submission.ipynb as Kaggle would, before uploading it.

The competition folder and the bundle are copied into an input tree that the notebook sees read-only (a
read-only bind mount in its own mount namespace); a venv of what Kaggle's image preinstalls
(kaggle/image-requirements.txt: another torch than our pins, none of our extra packages) runs it, so the
notebook must install everything else from the bundle's wheels, as on Kaggle (into a fresh layer over that
venv, so every rehearsal starts from the untouched image); nbclient executes it in a
network namespace with no network (root needed; without it the rehearsal stops, it never runs online).
The submission is then checked against test.csv (every id once, labels CC EC HGSC LGSC MC Other).
Ends with: RESULT rows=N missing=0 extra=0 network=none seconds=S python=X torch=Y
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ubc_ocean.kaggle.rehearsal import (
    RehearsalError,
    check_submission,
    execute_notebook,
    input_tree,
    layered_venv,
    namespaces_problem,
    submission_ok,
)

REPO = Path(__file__).resolve().parents[1]


def image_venv(requirements: Path, folder: Path | None) -> Path:
    """A venv holding exactly the image's list (built once per version of the list, then reused)."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    folder = folder or Path.home() / ".cache" / "ubc_ocean" / f"kaggle-image-{digest}"
    python, stamp = folder / "bin" / "python", folder / ".complete"
    if stamp.is_file() and stamp.read_text() == digest and python.is_file():
        return python
    print(f"building the image venv {folder} from {requirements} (once; several GB of CUDA torch)", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(folder)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(requirements)],
                   check=True)
    stamp.write_text(digest)
    return python


def versions(python: Path) -> tuple[str, str]:
    out = subprocess.run([str(python), "-c", "import sys, torch; print(sys.version.split()[0], torch.__version__)"],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], out[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, type=Path, help="the folder scripts/07_package_kaggle.py wrote")
    parser.add_argument("--competition-data", required=True, type=Path, help="the folder holding test.csv")
    parser.add_argument("--image-requirements", type=Path, default=REPO / "kaggle" / "image-requirements.txt")
    parser.add_argument("--venv", type=Path, help="the image venv (default: ~/.cache/ubc_ocean/kaggle-image-<hash>)")
    parser.add_argument("--work", type=Path, help="folder for the input tree and outputs (default: a temporary one)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per notebook cell")
    args = parser.parse_args()

    manifest_path = args.bundle / "MANIFEST.json"
    if not manifest_path.is_file() or not (args.competition_data / "test.csv").is_file():
        print(f"rehearsal: need a bundle ({manifest_path}) and competition data ({args.competition_data}/test.csv)",
              file=sys.stderr)
        return 2
    problem = namespaces_problem()
    if problem:  # never rehearse with the network on
        print(f"rehearsal: cannot isolate the notebook: {problem}", file=sys.stderr)
        return 2
    image_python = image_venv(args.image_requirements, args.venv)
    python_version, torch_version = versions(image_python)
    manifest = json.loads(manifest_path.read_text())
    if ".".join(python_version.split(".")[:2]) != manifest["python_version"]:
        print(f"rehearsal: the bundle's wheels are for Python {manifest['python_version']}, the image venv runs "
              f"{python_version}: build it with --python-version {'.'.join(python_version.split('.')[:2])}",
              file=sys.stderr)
        return 2

    work = (args.work or Path(tempfile.mkdtemp(prefix="kaggle-rehearsal-"))).resolve()
    working = work / "working"
    shutil.rmtree(working, ignore_errors=True)
    input_root, bundle = input_tree(args.bundle, args.competition_data, work / "input")
    python = layered_venv(image_python, work / "venv")  # the notebook installs here; the image venv stays clean
    print(f"input (read-only in the notebook): {input_root}\nworking: {working}\n"
          f"image venv: python {python_version}, torch {torch_version}", flush=True)
    try:
        execution = execute_notebook(bundle / "submission.ipynb", python, input_root, working, args.timeout)
    except RehearsalError as err:
        print(f"rehearsal: {err}", file=sys.stderr)
        return 2
    check = check_submission(working / "submission.csv", args.competition_data / "test.csv")
    print(f"executed notebook: {execution.executed}")
    print(f"RESULT rows={check['rows']} missing={check['missing']} extra={check['extra']} network=none "
          f"seconds={execution.seconds:.0f} python={python_version} torch={torch_version}")
    if execution.returncode != 0 or not submission_ok(check):
        print(f"rehearsal FAILED: notebook exit {execution.returncode}, submission check {check}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
