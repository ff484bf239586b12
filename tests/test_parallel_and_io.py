import os
import time

import pytest

from ubc_ocean.io_utils import FailureLog, atomic_path, clean_stale_temporaries
from ubc_ocean.parallel import TaskResult, parse_shard, run_tasks, select_shard, shard_output


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
