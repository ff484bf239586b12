"""Sharding and per-slide process pools with a progress bar, shared by the slide-level stages.

One bad slide never stops a stage: :func:`run_tasks` runs each task under a guard that turns any
``Exception`` the task raises (a reader, decoder, encoder or writer error the task did not classify itself)
into that slide's ``failed`` :class:`TaskResult`, inside the worker process, so nothing unpicklable crosses
the process boundary. ``KeyboardInterrupt``, ``SystemExit`` and config errors still stop the run. A
worker process that dies without a Python exception (a native decoder's segfault, the OOM killer) costs
only the slide it was working on: the pool is restarted and the slides it may have held are retried one
by one, so the culprit ends as a failure row instead of hanging or stopping the stage.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import sys
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")


# What a fork server loads once for every worker process it starts: the heavy libraries the workers import
# that are safe to fork (libvips and OpenCV start threads when they load: each worker loads them itself).
# Not torch: stage 05's decoders and the workers of stages 00-02 need none and would each hold its pages;
# a worker that needs it (stage 03's) imports it once, at its start.
FORK_SERVER_PRELOAD = ("numpy", "pandas", "scipy.ndimage", "h5py")


def process_context() -> Any:
    """How worker processes start (stage pools, stage 05's decoders). On Linux, from a fork server: one
    clean process, started at the first pool, that has loaded :data:`FORK_SERVER_PRELOAD` and forks each
    worker in milliseconds, where a spawned worker spends a second importing numpy, pandas and the rest (the
    default on Linux from Python 3.14). Elsewhere, spawned. Either way a worker starts without the caller's
    threads or state, and :func:`in_environment` gives it the caller's environment variables of the moment."""
    if not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(FORK_SERVER_PRELOAD))  # read when the server starts (the first pool)
    return context


def adopt_environment(environment: Mapping[str, str]) -> None:
    """Make ``os.environ`` equal ``environment`` (the caller's, in a worker): a fork server's workers inherit
    the variables the server started with, not the caller's of the moment, as a spawned worker would."""
    os.environ.clear()
    os.environ.update(environment)


def in_environment(environment: Mapping[str, str], target: Callable[..., T], *args: Any) -> T:
    """``target(*args)`` after :func:`adopt_environment` (a worker process's entry point)."""
    adopt_environment(environment)
    return target(*args)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS reports one (a container or
    ``taskset`` may allow fewer than the machine has), else every core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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
    """What one per-slide task reports back: a status (done/skipped/failed) and free-form numbers.

    ``error`` is the exception's type name when the task raised instead of returning (see
    :func:`run_tasks`), with the formatted ``traceback``; both are empty for a result the task returned.
    """

    item: str
    status: str
    message: str = ""
    count: int = 0
    error: str = ""
    traceback: str = ""


class RunFailed(RuntimeError):
    """A run that recorded what failed and kept what it could: the front door logs the message and ends
    with exit status 1 (no traceback)."""


class AllTasksFailed(RunFailed):
    """Every slide a stage tried failed with the same unexpected exception: a bug or a broken install,
    not that many bad files. Raised by :func:`run_tasks` once every result has been yielded (and so
    recorded by the stage)."""


def describe_item(item: Any) -> tuple[str, str]:
    """``(slide id, file name)`` of a task item, for the failure row of a task that raised.

    The id is the item's ``slide_id`` (attribute or mapping key), else ``str(item)``; the file name is
    that of its ``path`` attribute when it has one, else the id.
    """
    slide_id = getattr(item, "slide_id", None)
    if slide_id is None and isinstance(item, Mapping):
        slide_id = item.get("slide_id")
    slide_id = str(item if slide_id is None else slide_id)
    path = getattr(item, "path", None)
    return slide_id, Path(path).name if path is not None else slide_id


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class GuardedTask:
    """``task`` with any ``Exception`` turned into a ``failed`` result naming the file, the exception's type
    and text (one line), with the traceback as text. Picklable whenever ``task`` is, so it runs in the
    worker process and only strings come back. A :class:`ConfigError` (what the config cannot know until a
    task tries it, e.g. an encoder's input size) is the run's, not the slide's: it propagates."""

    def __init__(self, task: Callable[[Any], TaskResult]):
        self.task = task

    def __call__(self, item: Any) -> TaskResult:
        try:
            return self.task(item)
        except Exception as err:  # any error of one slide stays that slide's
            from ubc_ocean.config import ConfigError  # imported here: the config schema imports this module

            if isinstance(err, ConfigError):
                raise
            slide_id, name = describe_item(item)
            kind = type(err).__name__
            text = one_line(str(err)) or "(no message)"
            return TaskResult(slide_id, "failed", f"{name}: unexpected {kind}: {text}", error=kind,
                              traceback=traceback.format_exc())


def run_tasks(
    items: Iterable[Any],
    task: Callable[[Any], TaskResult],
    workers: int = 1,
    desc: str = "slides",
    unit_counted: str = "tiles",
) -> Iterator[TaskResult]:
    """Run ``task`` on every item, in ``workers`` processes when > 1, yielding results as they finish.

    The progress bar shows items done, the summed ``count`` (e.g. tiles cut) and the ETA. An exception
    raised by ``task`` becomes that item's ``failed`` result (:class:`GuardedTask`; its message names
    the item's file, see :func:`describe_item`), its traceback logged at DEBUG and the run goes on. When
    at least two items were tried (not skipped), none succeeded and every one raised the same exception
    type, it raises :class:`AllTasksFailed` after yielding the last result.
    """
    items = list(items)
    totals = {"done": 0, "skipped": 0, "failed": 0}
    counted = 0
    unexpected = UnexpectedErrors()
    guarded = GuardedTask(task)
    bar = tqdm(total=len(items), desc=desc, unit="slide", dynamic_ncols=True)
    if workers > 1 and len(items) > 1:
        results: Iterator[TaskResult] = _in_processes(guarded, items, workers)
    else:
        results = map(guarded, items)
    try:
        for result in results:
            totals[result.status] = totals.get(result.status, 0) + 1
            counted += result.count
            bar.update(1)
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            rate = f"{counted / elapsed:.1f}"
            bar.set_postfix({unit_counted: counted, f"{unit_counted}/s": rate, **totals}, refresh=False)
            if result.error:
                unexpected.record(result.error, result.message)
                log.debug("%s: traceback of the unexpected error:\n%s", result.item, result.traceback.rstrip())
            yield result
    finally:
        bar.close()
        close = getattr(results, "close", None)
        if close is not None:  # stops the worker processes when the caller leaves early
            close()
    unexpected.check(desc, len(items), totals["done"] + totals["failed"])


@dataclass
class UnexpectedErrors:
    """A run's slides that failed with an unexpected error (a bug, a broken install; not a bad file's error):
    how many of each exception type, and the last one's message."""

    kinds: Counter[str] = field(default_factory=Counter)
    last: str = ""

    def record(self, kind: str, message: str) -> None:
        """One failed slide's error type (``""``: an expected failure, not counted) and message."""
        if kind:
            self.kinds[kind] += 1
            self.last = message

    def check(self, desc: str, total: int, tried: int) -> None:
        """After a run over ``total`` slides, ``tried`` of them (done or failed, not skipped): log how many
        failed unexpectedly, and raise :class:`AllTasksFailed` when at least two were tried and every one
        failed with the same type."""
        kinds = self.kinds
        if not kinds:
            return
        listed = ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common())
        hint = "" if log.isEnabledFor(logging.DEBUG) else "; rerun with --log-level DEBUG for the tracebacks"
        log.warning("%s: %d of %d slides failed with an unexpected error (%s)%s", desc, kinds.total(), total,
                    listed, hint)
        if tried >= 2 and len(kinds) == 1 and kinds.total() == tried:
            raise AllTasksFailed(
                f"{desc}: all {tried} slides tried failed with the same unexpected {next(iter(kinds))} "
                f"(last: {self.last}), more often a bug or a broken install than {tried} bad files; "
                f"each has its row in the stage's failures file, tracebacks at --log-level DEBUG"
            )


_ANNOUNCE: Any = None  # in a worker process: where it says which item it starts


def _remember_announcer(queue: Any, environment: Mapping[str, str]) -> None:
    global _ANNOUNCE
    adopt_environment(environment)
    _ANNOUNCE = queue


def _announced(task: Callable[[Any], TaskResult], index: int, item: Any) -> tuple[int, TaskResult]:
    _ANNOUNCE.put(index)
    return index, task(item)


def _in_processes(task: GuardedTask, items: Sequence[Any], workers: int) -> Iterator[TaskResult]:
    """``task`` over ``items`` in ``workers`` worker processes (:func:`process_context`), results as they finish.

    Each worker announces the item it starts. When a worker dies (no Python exception can tell which slide
    killed it), the items started but not finished are retried one at a time, each in a process of its
    own: the one that kills its process again gets a failure row; the rest run on in a fresh pool.
    """
    context = process_context()
    pending = dict(enumerate(items))
    while pending:
        queue = context.SimpleQueue()
        pool = ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=context,
                                   initializer=_remember_announcer, initargs=(queue, dict(os.environ)))
        broken = finished = False
        try:
            futures = [pool.submit(_announced, task, index, item) for index, item in pending.items()]
            for future in as_completed(futures):
                try:
                    index, result = future.result()
                except BrokenProcessPool:  # every unfinished future says so; the finished ones still count
                    broken = True
                    continue
                del pending[index]
                yield result
            finished = True
        finally:
            _stop(pool, wait_for_workers=finished)
        if not broken:
            return
        suspects = sorted(_drain(queue) & set(pending))
        log.warning("a worker process died; retrying the %d slides it may have held one at a time", len(suspects))
        for index in suspects:
            yield _alone(task, pending.pop(index), context)


def _drain(queue: Any) -> set[int]:
    started = set()
    while not queue.empty():
        started.add(queue.get())
    return started


def _alone(task: GuardedTask, item: Any, context: Any) -> TaskResult:
    """``task(item)`` in a process of its own; a process that dies is the item's failure row."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_remember_announcer,
                               initargs=(context.SimpleQueue(), dict(os.environ)))
    try:
        return pool.submit(_announced, task, 0, item).result()[1]
    except BrokenProcessPool:
        slide_id, name = describe_item(item)
        return TaskResult(slide_id, "failed", f"{name}: the worker process died while processing it (a crash "
                          "in a native reader or decoder, or out of memory)", error="WorkerDied")
    finally:
        _stop(pool, wait_for_workers=True)


def _stop(pool: ProcessPoolExecutor, wait_for_workers: bool) -> None:
    """Shut ``pool`` down; on an early exit (interrupt, error) its workers are killed, not awaited."""
    if not wait_for_workers:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            if process.is_alive():
                process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


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
