import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.builders import REPO
from ubc_ocean.config import ConfigError
from ubc_ocean.io_utils import FailureLog, atomic_path, clean_stale_temporaries
from ubc_ocean.parallel import AllTasksFailed, TaskResult, parse_shard, run_tasks, select_shard, shard_output


def test_shards_are_disjoint_and_complete():
    items = [f"train/{i}" for i in range(23)]
    shards = [select_shard(items, f"{i}/4") for i in range(4)]
    flat = [x for shard in shards for x in shard]
    assert sorted(flat) == sorted(items)
    assert len(flat) == len(set(flat))
    assert select_shard(items, None) == sorted(items)
    assert select_shard(list(reversed(items)), "1/4") == shards[1]  # independent of input order


@pytest.mark.parametrize("bad", ["4/4", "x/2", "1", "-1/3"])
def test_bad_shard_text(bad):
    with pytest.raises(ValueError, match="shard"):
        parse_shard(bad)


def _square(x: int) -> TaskResult:
    return TaskResult(str(x), "done" if x % 3 else "failed", count=x * x)


@pytest.mark.parametrize("workers", [1, 2])
def test_run_tasks_yields_every_result(workers):
    results = list(run_tasks(range(7), _square, workers=workers, desc="t"))
    assert sorted(int(r.item) for r in results) == list(range(7))
    assert sum(r.count for r in results) == sum(x * x for x in range(7))


class Stubborn(Exception):
    """Does not survive pickling (unpickling calls ``__init__`` with the message alone), as many library
    exceptions: it must be turned into text inside the worker."""

    def __init__(self, code: int, detail: str):
        super().__init__(f"code {code}: {detail}")


@dataclass(frozen=True)
class Item:
    slide_id: str
    path: Path


def _tile_or_explode(item: Item) -> TaskResult:
    if item.slide_id.endswith(("1", "3")):
        raise Stubborn(7, "Not a JPEG file:\n starts with 0x00")
    return TaskResult(item.slide_id, "done", count=1)


def _raise(kind: str) -> TaskResult:
    if kind == "interrupt":
        raise KeyboardInterrupt
    if kind == "exit":
        raise SystemExit(3)
    if kind == "config":
        raise ConfigError("features.input_size must be 224 for this preset")
    if kind == "done":
        return TaskResult(kind, "done")
    if kind == "skipped":
        return TaskResult(kind, "skipped")
    raise {"key": KeyError, "type": TypeError}[kind.split("-")[0]](kind)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_raising_task_is_its_items_failure_and_the_run_goes_on(workers, caplog):
    items = [Item(f"ext/{i}", Path(f"/data/slide{i}.svs")) for i in range(5)]
    with caplog.at_level(logging.DEBUG, logger="ubc_ocean.parallel"):
        results = {r.item: r for r in run_tasks(items, _tile_or_explode, workers=workers, desc="t")}
    assert sorted(results) == [item.slide_id for item in items]
    assert [results[f"ext/{i}"].status for i in range(5)] == ["done", "failed", "done", "failed", "done"]
    failed = results["ext/3"]
    assert failed.message == "slide3.svs: unexpected Stubborn: code 7: Not a JPEG file: starts with 0x00"
    assert failed.error == "Stubborn" and "_tile_or_explode" in failed.traceback
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(m.startswith("ext/3: traceback") and "raise Stubborn" in m for m in debug)
    assert "2 of 5 slides failed with an unexpected error (Stubborn x2)" in caplog.text


@pytest.mark.parametrize("kind", ["interrupt", "exit", "config"])
def test_interrupts_and_config_errors_still_stop_the_run(kind):
    expected = {"interrupt": KeyboardInterrupt, "exit": SystemExit, "config": ConfigError}[kind]
    with pytest.raises(expected):
        list(run_tasks(["done", kind, "done"], _raise))


def test_config_error_in_a_worker_process_stops_the_run():
    with pytest.raises(ConfigError, match="input_size"):
        list(run_tasks(["done", "config"], _raise, workers=2))


@pytest.mark.parametrize(("kinds", "stops"), [
    (["key-1", "key-2", "skipped"], True),     # every slide tried raised the same: a bug, not bad files
    (["key-1"], False),                        # one slide cannot tell a bug from a bad file
    (["key-1", "type-2"], False),              # different errors: different files
    (["key-1", "key-2", "done"], False),       # something worked
])
def test_a_stage_where_every_slide_fails_alike_ends_in_error(kinds, stops):
    seen = []
    if stops:
        with pytest.raises(AllTasksFailed, match="all 2 slides tried failed with the same unexpected KeyError"):
            seen.extend(run_tasks(kinds, _raise))
    else:
        seen.extend(run_tasks(kinds, _raise))
    assert sorted(r.item for r in seen) == sorted(kinds)  # every row was handed out before the error


def _what_the_worker_has(item: str) -> TaskResult:
    """The variable the test set; whether the fork server's libraries are loaded and torch is not."""
    from ubc_ocean.parallel import FORK_SERVER_PRELOAD

    variable = os.environ.get("UBC_OCEAN_TEST_VARIABLE")
    preloaded = all(name in sys.modules for name in FORK_SERVER_PRELOAD)
    return TaskResult(item, "done", f"{variable}|{preloaded}/{'torch' in sys.modules}|{os.getpid()}")


def test_workers_see_the_callers_environment_of_the_moment_and_start_with_the_preloaded_libraries(monkeypatch):
    """A worker reads the environment its caller has when the pool starts (a fork server's workers would
    otherwise have the server's, from the first pool); on Linux it is forked from the fork server, which has
    loaded numpy, pandas and the rest once for all of them, and not torch: a worker of stages 00-02 or a
    stage-05 decoder needs none, and the caller (this test's process) has it loaded."""
    import torch  # noqa: F401  (loaded in the caller, as in stage 05)

    from ubc_ocean.parallel import FORK_SERVER_PRELOAD, process_context

    monkeypatch.setenv("UBC_OCEAN_TEST_VARIABLE", "first")
    first = [r.message.split("|") for r in run_tasks(["a", "b"], _what_the_worker_has, workers=2)]
    monkeypatch.setenv("UBC_OCEAN_TEST_VARIABLE", "second")
    second = [r.message.split("|") for r in run_tasks(["c", "d"], _what_the_worker_has, workers=2)]
    assert {variable for variable, _, _ in first} == {"first"}
    assert {variable for variable, _, _ in second} == {"second"}
    assert len({pid for *_, pid in first + second} | {str(os.getpid())}) == 5  # four workers, none of them this one
    if sys.platform.startswith("linux"):
        assert process_context().get_start_method() == "forkserver" and "torch" not in FORK_SERVER_PRELOAD
        assert {loaded for _, loaded, _ in first + second} == {"True/False"}


def _die_on(item: str) -> TaskResult:
    if item == "poison":
        os.kill(os.getpid(), signal.SIGKILL)  # a native crash or the OOM killer: no Python exception
    time.sleep(0.2)
    return TaskResult(item, "done", count=1)


def test_a_worker_process_that_dies_costs_only_its_slide(caplog):
    """The pool is restarted and the slides the dead worker may have held are retried alone: the poison
    one is a failure row, every other slide is done, and nothing hangs (an alarm stops a hang)."""
    items = ["a", "b", "poison", "c", "d", "e"]
    signal.alarm(240)
    try:
        results = {r.item: r for r in run_tasks(items, _die_on, workers=2)}
    finally:
        signal.alarm(0)
    assert sorted(results) == sorted(items)
    assert results["poison"].status == "failed" and "worker process died" in results["poison"].message
    assert all(results[i].status == "done" for i in items if i != "poison")
    assert "a worker process died" in caplog.text


def test_cli_reports_a_stage_that_failed_throughout_as_exit_1(tmp_path, caplog):
    from ubc_ocean.cli import main

    def run(cfg):
        raise AllTasksFailed("tiling: all 3 slides tried failed with the same unexpected TypeError")

    assert main(run, "t", ["--config", str(REPO / "configs" / "demo.yaml"), f"paths.data_root={tmp_path}"]) == 1
    assert "all 3 slides tried failed" in caplog.text


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "slide"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("whole")
    assert (final / "a.txt").read_text() == "whole"


def test_only_temporaries_without_a_live_writer_are_cleaned(tmp_path):
    """A killed run's leftovers go; another shard's folder in the making stays (it used to be deleted
    under the other process, which then renamed a folder missing tiles into place)."""
    import subprocess
    import sys

    from ubc_ocean.io_utils import _HOST

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    old = time.time() - 7 * 3600
    names = {
        f".tmp-dead@{_HOST}@{finished.pid}": "gone",
        f".tmp-live@{_HOST}@{os.getpid()}": "kept",
        ".tmp-elsewhere@other-node@123": "kept",  # another host, recently touched
        ".tmp-elsewhere-old@other-node@123": "gone",
        ".tmp-legacy-99999": "gone",
        "done": "kept",
    }
    for name in names:
        (tmp_path / name).mkdir()
    for name in (".tmp-elsewhere-old@other-node@123", ".tmp-legacy-99999"):
        os.utime(tmp_path / name, (old, old))
    assert clean_stale_temporaries(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, fate in names.items() if fate == "kept")
    with atomic_path(tmp_path / "slide") as tmp:  # this process's own temporaries carry host and pid
        assert tmp.name == f".tmp-slide@{_HOST}@{os.getpid()}"
        tmp.write_text("whole")


def test_failure_log_appends_rows(tmp_path):
    log = FailureLog(tmp_path / "failures.csv", "01")
    log.record("train/1", "bad\nthing")
    log.record("train/2", "worse")
    frame = log.read()
    assert frame["slide"].tolist() == ["train/1", "train/2"]
    assert frame["message"][0] == "bad thing"


def test_shard_outputs_never_collide_and_other_layouts_are_removed(tmp_path):
    names = ["p.csv", "p_shard0of2.csv", "p_shard1of2.csv", "p_shard0of3.csv", "pay.csv", "p_shard0of2.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert shard_output(tmp_path, "p.csv", "1/2") == tmp_path / "p_shard1of2.csv"
    # The sibling shard of the same layout stays (it may be running); the unsharded and 3-shard files go.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p_shard0of2.csv", "p_shard0of2.txt", "p_shard1of2.csv",
                                                          "pay.csv"]
    assert shard_output(tmp_path, "p.csv", None) == tmp_path / "p.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p_shard0of2.txt", "pay.csv"]
