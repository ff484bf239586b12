"""Atomic writes, failure records and small file helpers shared by every stage."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd


class MissingInput(FileNotFoundError):
    """An input a stage reads is not there: ``path``, what is wrong with it (``problem``: not found, or holds
    nothing usable) and ``remedy``, what makes it (the stage to run, or how to get the competition data). The
    command-line doors print it as one ``missing input:`` line and exit 2."""

    def __init__(self, path: str | Path, remedy: str, problem: str = "not found") -> None:
        self.path, self.remedy = Path(path), remedy
        super().__init__(f"{path} {problem}: {remedy}")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only if the block succeeds.

    Works for files and directories. A crash leaves a ``.tmp-*`` leftover, never a half-written final. A
    folder being replaced is renamed aside (``.old-*``) and deleted only once the new one is in place, so a
    process killed at any moment leaves the old folder whole: under its name, or aside for
    :func:`clean_stale_temporaries` to put back.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}@{_HOST}@{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            aside = final.parent / f".old-{final.name}@{_HOST}@{os.getpid()}"
            _remove(aside)
            os.replace(final, aside)
            os.replace(tmp, final)
            _remove(aside)
        else:
            os.replace(tmp, final)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


_HOST = socket.gethostname().replace("@", "_")
FOREIGN_TEMPORARY_MAX_AGE_S = 6 * 3600


def _is_stale(path: Path) -> bool:
    """A temporary is stale when its writer is gone: a dead process on this host; for another host's
    (shared storage, job arrays) or an unnamed writer, when untouched for ``FOREIGN_TEMPORARY_MAX_AGE_S``."""
    parts = path.name.rsplit("@", 2)
    if len(parts) == 3 and parts[1] == _HOST and parts[2].isdigit():
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        return False
    return time.time() - path.lstat().st_mtime > FOREIGN_TEMPORARY_MAX_AGE_S


def clean_stale_temporaries(folder: str | Path) -> int:
    """Remove ``.tmp-*`` leftovers of killed runs in ``folder``, never one that a live process (another
    shard, say) is still writing; returns how many were removed. A folder that a killed process had renamed
    aside (``.old-{name}@...``, see :func:`atomic_path`) is put back when ``{name}`` is missing, else removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for aside in [path for path in folder.glob(".old-*") if _is_stale(path)]:
        original = folder / aside.name.removeprefix(".old-").rsplit("@", 2)[0]
        if original.exists() or original.is_symlink():
            _remove(aside)
        else:
            os.replace(aside, original)
    stale = [path for path in folder.glob(".tmp-*") if _is_stale(path)]
    for path in stale:
        _remove(path)
    return len(stale)


class FailureLog:
    """Append-only CSV of (slide, stage, message): one row per slide that a stage could not process."""

    columns = ("slide", "stage", "message")

    def __init__(self, path: str | Path, stage: str):
        self.path = Path(path)
        self.stage = stage
        self.count = 0

    def record(self, slide: str, message: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(self.columns)
            writer.writerow([slide, self.stage, message.replace("\n", " ")])
        self.count += 1

    def read(self) -> pd.DataFrame:
        if not self.path.exists():
            return pd.DataFrame(columns=list(self.columns))
        return pd.read_csv(self.path)


def make_temp_dir(prefix: str = "ubc_ocean-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
