"""Shared fixtures. Data builders live in ``tests/builders.py``; test modules import them from there."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.builders import LEAN, build_tiny_run, built_once, tiny_config, tiny_run_config
from ubc_ocean.config import Config


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker owns one core (its processes, children included, run there). Torch is
    imported here and in the fixtures, not at the top: the xdist controller, which runs no test, never loads it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and hasattr(os, "sched_setaffinity"):
        import torch

        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})
        torch.set_num_threads(1)


LONG_MARKERS = ("slow", "long")  # end-to-end runs, and other tests of five seconds or more on one core


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the long tests lead the workers' shares: worksteal gives worker i the i-th
    contiguous part of this order and an idle worker takes tests from the end of another's queue, so a long
    test near an end would keep one worker busy alone at the finish while the other waits."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    long = [item for item in items if any(item.get_closest_marker(m) for m in LONG_MARKERS)]
    if workers < 2 or not long:
        return
    rest = iter([item for item in items if item not in long])
    ordered, left = [], len(items)
    for share in range(workers):  # worksteal's first split: each worker takes len(pending) // (workers left)
        size = left // (workers - share)
        leading = long[share::workers]
        ordered += leading + [next(rest) for _ in range(max(0, size - len(leading)))]
        left -= size
    ordered += list(rest)
    items[:] = ordered


@pytest.fixture(scope="session", autouse=True)
def private_weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Weights checksums are remembered in a folder of the test session, never the user's cache."""
    before = os.environ.get("UBC_OCEAN_CACHE")
    os.environ["UBC_OCEAN_CACHE"] = str(tmp_path_factory.mktemp("weights_cache"))
    yield
    if before is None:
        os.environ.pop("UBC_OCEAN_CACHE", None)
    else:
        os.environ["UBC_OCEAN_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A generated tiny raw folder (stage 00 output), shared read-only by the tests that need one."""
    from ubc_ocean.synthetic import generate

    return tiny_config(built_once(tmp_path_factory, "tiny", lambda root: generate(tiny_config(root))))


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data root after stages 00-05 on the tiny data with one lean model (``LEAN``); read-only (tests
    that write take a copy)."""
    from ubc_ocean.external.stage import run as merge
    from ubc_ocean.features.stage import run as embed
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train
    from ubc_ocean.synthetic import generate
    from ubc_ocean.tiling.stage import run as tile

    def build(folder: Path) -> None:
        cfg = tiny_config(folder / "data", *LEAN)
        generate(cfg)
        assert tile(cfg)["failed"] == 0
        merge(cfg)
        embed(cfg)
        train(cfg)
        infer(cfg)

    return built_once(tmp_path_factory, "hostile", build) / "data"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A tiny trained run (stages 00-06, ABMIL, DSMIL, Chowder and TransMIL; ``builders.build_tiny_run``),
    built once per test run and shared read-only by the notebook, heatmap and report tests."""
    return tiny_run_config(built_once(tmp_path_factory, "tiny_run", build_tiny_run))


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Tiny tensors run fastest (and steadiest on a busy machine) on one intra-op thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
