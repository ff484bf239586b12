"""Shared fixtures. Data builders live in ``tests/builders.py``; test modules import them from there."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.builders import LEAN, build_tiny_run, tiny_config
from ubc_ocean.config import Config


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

    cfg = tiny_config(tmp_path_factory.mktemp("tiny"))
    generate(cfg)
    return cfg


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

    root = tmp_path_factory.mktemp("hostile") / "data"
    cfg = tiny_config(root, *LEAN)
    generate(cfg)
    assert tile(cfg)["failed"] == 0
    merge(cfg)
    embed(cfg)
    train(cfg)
    infer(cfg)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A tiny trained run (stages 00-06, ABMIL, DSMIL, Chowder and TransMIL; ``builders.build_tiny_run``),
    built once per session and shared read-only by the notebook, heatmap and report tests."""
    return build_tiny_run(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Tiny tensors run fastest (and steadiest on a busy machine) on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
