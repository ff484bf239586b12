"""Run a bundle's notebook the way Kaggle would, on this machine: the competition data and the bundle in an
input tree mounted read-only, the notebook executed by nbclient with no network at all, then the submission
checked against ``test.csv``. Used by ``scripts/kaggle_rehearsal.py`` and the tests.

Isolation needs root's namespaces: ``unshare --mount --net`` gives a private mount table (where a read-only
bind mount makes the input read-only even for root, who ignores permission bits) and a network namespace
holding only a loopback interface (which the kernel's ZeroMQ sockets need; nothing else is reachable). When
they cannot be had this module raises: it never runs the notebook with the network on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

LABELS = ("CC", "EC", "HGSC", "LGSC", "MC", "Other")

# Inside the namespaces: the input read-only, loopback up, then a probe that must find no network.
_ISOLATE = """set -eu
ip link set lo up
mount --bind "$REHEARSAL_INPUT" "$REHEARSAL_INPUT"
mount -o remount,bind,ro "$REHEARSAL_INPUT"
exec "$REHEARSAL_PYTHON" -c "$REHEARSAL_CODE" "$@"
"""

_EXECUTE = r"""
import errno, socket, sys, time
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

notebook_path, executed_path, working, timeout = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for host in ("1.1.1.1", "8.8.8.8"):  # no route anywhere but loopback, or this is not a rehearsal
    try:
        socket.create_connection((host, 53), timeout=3).close()
    except OSError as err:
        if err.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EADDRNOTAVAIL):
            print(f"network probe to {host}: unexpected {err!r}", flush=True)
        continue
    print(f"NETWORK REACHABLE: connected to {host}:53; refusing to rehearse", flush=True)
    sys.exit(3)
print("network=none (no route but loopback)", flush=True)
try:
    open(sys.argv[5] + "/.write-probe", "w").close()
    print(f"INPUT WRITABLE: {sys.argv[5]}; refusing to rehearse", flush=True)
    sys.exit(3)
except OSError:
    print("input read-only", flush=True)


def show(cell, cell_index, **_):
    for output in cell.get("outputs", []):
        text = output.get("text") or "".join(output.get("traceback", [])) or ""
        if text:
            print(text if isinstance(text, str) else "".join(text), end="" if str(text).endswith("\n") else "\n",
                  flush=True)


notebook = nbformat.read(notebook_path, as_version=4)
client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": working}},
                        on_cell_executed=show)
start = time.monotonic()
status = 0
try:
    client.execute()
except CellExecutionError as err:
    print(f"NOTEBOOK FAILED: {str(err).splitlines()[0] if str(err) else err!r}", flush=True)
    status = 1
finally:
    nbformat.write(notebook, executed_path)
print(f"notebook seconds={time.monotonic() - start:.1f}", flush=True)
sys.exit(status)
"""


class RehearsalError(RuntimeError):
    """The rehearsal could not be run as Kaggle would run the notebook (no namespaces, network reachable, ...)."""


def namespaces_problem() -> str | None:
    """Why a mount + network namespace cannot be had here (None when it can)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip (util-linux, iproute2) is not installed"
    try:
        result = subprocess.run(["unshare", "--mount", "--net", "sh", "-c", "ip link set lo up"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unshare failed: {err}"
    if result.returncode != 0:
        return f"unshare --mount --net is refused (root needed): {result.stderr.strip() or result.returncode}"
    return None


def link_or_copy_tree(source: Path, target: Path) -> None:
    """Copy a folder, hard-linking files where the file system allows (the input is mounted read-only)."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, symlinks=False)


def input_tree(bundle: Path, competition: Path, root: Path) -> tuple[Path, Path]:
    """An input root holding copies of the competition data and the bundle, under names unlike the bundle
    configs' defaults and at Kaggle's depths (``competitions/<slug>``, ``datasets/<user>/<slug>``): the
    notebook must find both by content. Returns ``(input root, the bundle's copy)``."""
    shutil.rmtree(root, ignore_errors=True)
    copy = root / "datasets" / "someone" / "rehearsal-bundle"
    link_or_copy_tree(competition, root / "competitions" / "rehearsal-competition")
    link_or_copy_tree(bundle, copy)
    return root, copy


def clean_environment(base: Mapping[str, str], python: Path, input_root: Path, working: Path) -> dict[str, str]:
    """The notebook's environment: Kaggle's folders moved here, this machine's pip settings (local indexes,
    constraints) and Python paths removed, so pip sees only the bundle's wheels."""
    env = {k: v for k, v in base.items() if not k.startswith(("PIP_", "PYTHON", "UBC_OCEAN_", "VIRTUAL_ENV"))}
    env.update(UBC_OCEAN_INPUT=str(input_root), UBC_OCEAN_WORKING=str(working), PIP_CONFIG_FILE=os.devnull,
               PATH=f"{python.parent}{os.pathsep}{base.get('PATH', '/usr/bin:/bin')}", PYTHONNOUSERSITE="1")
    return env


def layered_venv(base_python: Path, path: Path) -> Path:
    """A fresh venv at ``path`` that sees ``base_python``'s packages (a ``.pth`` line) but installs into its own
    site-packages: what the notebook's pip installs lands there and the base venv stays as it was, as every
    Kaggle session starts from the untouched image. Returns the layer's python."""
    shutil.rmtree(path, ignore_errors=True)
    code = "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])"
    base_paths = subprocess.run([str(base_python), "-c", code], capture_output=True, text=True,
                                check=True).stdout.split()
    subprocess.run([str(base_python), "-m", "venv", "--without-pip", str(path)], check=True)
    site = next(path.glob("lib/python*/site-packages"))
    (site / "zz_base_venv.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(base_paths)))
    return path / "bin" / "python"


@dataclass
class Execution:
    returncode: int
    seconds: float
    executed: Path
    output: str


def execute_notebook(notebook: Path, python: Path, input_root: Path, working: Path, timeout: int = 3600,
                     echo: bool = True) -> Execution:
    """Execute ``notebook`` with ``python``'s nbclient and kernel inside fresh mount and network namespaces,
    ``input_root`` read-only, outputs under ``working``. Raises :class:`RehearsalError` when the namespaces
    cannot be had or the network turns out reachable."""
    problem = namespaces_problem()
    if problem:
        raise RehearsalError(f"cannot isolate the notebook: {problem}")
    working.mkdir(parents=True, exist_ok=True)
    executed = working.parent / f"{notebook.stem}.executed.ipynb"
    env = clean_environment(os.environ, python, input_root, working)
    env.update(REHEARSAL_INPUT=str(input_root), REHEARSAL_PYTHON=str(python), REHEARSAL_CODE=_EXECUTE)
    command = ["unshare", "--mount", "--net", "sh", "-c", _ISOLATE, "rehearsal",
               str(notebook), str(executed), str(working), str(timeout), str(input_root)]
    start = time.monotonic()
    lines = []
    with subprocess.Popen(command, env=env, cwd=working, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
    seconds = time.monotonic() - start
    output = "".join(lines)
    if process.returncode == 3 or "network=none" not in output:
        raise RehearsalError(f"the notebook was not run in isolation (exit {process.returncode}): "
                             f"{output.strip().splitlines()[-1] if output.strip() else 'no output'}")
    return Execution(process.returncode, seconds, executed, output)


def check_submission(submission: Path, test_csv: Path) -> dict:
    """Rows, ids of ``test.csv`` missing from the submission, ids it adds, repeated ids and unknown labels."""
    test = pd.read_csv(test_csv, dtype={"image_id": str})
    if not submission.is_file():
        return {"rows": 0, "missing": len(test), "extra": 0, "repeated": 0, "bad_labels": [], "columns": []}
    result = pd.read_csv(submission, dtype={"image_id": str})
    ids, expected = result.get("image_id", pd.Series(dtype=str)), set(test["image_id"])
    return {
        "rows": len(result), "columns": list(result.columns),
        "missing": len(expected - set(ids)), "extra": len(set(ids) - expected),
        "repeated": int(ids.duplicated().sum()),
        "bad_labels": sorted(set(result.get("label", pd.Series(dtype=str)).astype(str)) - set(LABELS)),
    }


def submission_ok(check: Mapping) -> bool:
    return (check["columns"] == ["image_id", "label"] and check["missing"] == 0 and check["extra"] == 0
            and check["repeated"] == 0 and not check["bad_labels"])
