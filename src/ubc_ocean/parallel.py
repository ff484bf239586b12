"""Sharding and per-slide process pools with a progress bar, shared by the slide-level stages."""

from __future__ import annotations

import logging
import multiprocessing as mp
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")


def parse_shard(text: str | None) -> tuple[int, int]:
    """Parse ``"i/n"`` (0-based i) into ``(i, n)``; ``None`` means the whole set, ``(0, 1)``."""
    if text in (None, "", "null"):
        return 0, 1
    try:
        index_text, count_text = str(text).split("/")
        index, count = int(index_text), int(count_text)
    except ValueError as err:
        raise ValueError(f"shard must look like 'i/n' (e.g. 0/4), got {text!r}") from err
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {text!r}: need 0 <= i < n")
    return index, count


def shard_output(folder: Path, name: str, shard: str | None) -> Path:
    """This shard's file for ``name`` in ``folder``: ``name`` itself unsharded, ``{stem}_shard{i}of{n}{ext}``
    for shard i/n, so concurrent shards never write or delete one another's file. Files of another
    layout (unsharded vs sharded, or another shard count) are deleted as stale: read together, they would
    repeat or contradict this run's rows."""
    index, count = parse_shard(shard)
    stem, ext = Path(name).stem, Path(name).suffix
    own = name if count == 1 else f"{stem}_shard{index}of{count}{ext}"
    layout = re.compile(re.escape(stem) + r"(?:_shard\d+of(\d+))?" + re.escape(ext))  # group: shard count
    for path in folder.glob(f"{stem}*{ext}"):
        match = layout.fullmatch(path.name)
        if match and int(match.group(1) or 1) != count:
            log.info("removing %s: written by a run sharded otherwise", path)
            path.unlink(missing_ok=True)
    return folder / own


def select_shard(items: Sequence[T], shard: str | None, key: Callable[[T], str] = str) -> list[T]:
    """Deterministic round-robin split over the items sorted by ``key``: shards are disjoint and complete."""
    index, count = parse_shard(shard)
    ordered = sorted(items, key=key)
    return ordered[index::count]


@dataclass
class TaskResult:
    """What one per-slide task reports back: a status (done/skipped/failed) and free-form numbers."""

    item: str
    status: str
    message: str = ""
    count: int = 0


def run_tasks(
    items: Iterable[Any],
    task: Callable[[Any], TaskResult],
    workers: int = 1,
    desc: str = "slides",
    unit_counted: str = "tiles",
) -> Iterator[TaskResult]:
    """Run ``task`` on every item, in ``workers`` processes when > 1, yielding results as they finish.

    The progress bar shows items done, the summed ``count`` (e.g. tiles cut) and the ETA.
    """
    items = list(items)
    totals = {"done": 0, "skipped": 0, "failed": 0}
    counted = 0
    bar = tqdm(total=len(items), desc=desc, unit="slide", dynamic_ncols=True)
    if workers > 1 and len(items) > 1:
        context = mp.get_context("spawn")
        pool = context.Pool(processes=min(workers, len(items)))
        results: Iterable[TaskResult] = pool.imap_unordered(task, items)
    else:
        pool = None
        results = map(task, items)
    try:
        for result in results:
            totals[result.status] = totals.get(result.status, 0) + 1
            counted += result.count
            bar.update(1)
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            rate = f"{counted / elapsed:.1f}"
            bar.set_postfix({unit_counted: counted, f"{unit_counted}/s": rate, **totals}, refresh=False)
            yield result
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def threaded_map(
    fn: Callable[[T], Any], items: Iterable[T], threads: int = 2, lookahead: int = 32
) -> Iterator[tuple[T, Any]]:
    """Yield ``(item, fn(item))`` in input order, computing ``fn`` on threads while ``items`` is produced.

    Worth it when ``fn`` releases the GIL (OpenCV, NumPy) and producing items does too (libvips decoding):
    the two then overlap. At most ``lookahead`` items wait in memory.
    """
    pending: deque[tuple[T, Future]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="threaded-map") as pool:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= lookahead:
                done_item, future = pending.popleft()
                yield done_item, future.result()
        while pending:
            done_item, future = pending.popleft()
            yield done_item, future.result()
