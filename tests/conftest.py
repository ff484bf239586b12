"""Shared fixtures: a tiny synthetic UBC-OCEAN folder, made once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ubc_ocean.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]

# A config small enough for the whole pipeline to run in well under a minute on 2 CPU cores.
TINY_OVERRIDES = [
    "synthetic.wsi_per_class=2",
    "synthetic.tma_per_class=1",
    "synthetic.test_images=6",
    "synthetic.test_other=1",
    "synthetic.wsi_width=[700,900]",
    "synthetic.wsi_height=[500,640]",
    "synthetic.tma_sides=[480,520]",
    "synthetic.thumbnail_max_side=256",
    "synthetic.external_tiff_slides=2",
    "synthetic.external_patch_slides=2",
    "synthetic.external_patches_per_slide=6",
    "synthetic.workers=1",
    "slides.tma_max_side=600",
    "tiling.tile_size=64",
    "tiling.max_tiles_per_slide=24",
    "tiling.mask_max_side=256",
    "features.input_size=64",
    "features.batch_size=32",
    "runtime.workers=1",
    "folds.n_splits=2",
    "mil.models=[abmil,transmil]",
    "mil.model_options={transmil: {hidden_dim: 64}, abmil: {hidden_dim: 64, attention_dim: 32}}",
    "mil.epochs=3",
    "mil.max_instances=16",
]


def tiny_overrides(data_root: Path, *extra: str) -> list[str]:
    """Command-line overrides that shrink the demo config and write everything under ``data_root``."""
    return [*TINY_OVERRIDES, f"paths.data_root={data_root}", f"paths.submissions={data_root / 'submissions'}", *extra]


def tiny_config(data_root: Path, *extra: str) -> Config:
    """The demo config shrunk for tests, writing everything under ``data_root``."""
    return load_config(REPO / "configs" / "demo.yaml", tiny_overrides(data_root, *extra))


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A generated tiny raw folder (stage 00 output), shared read-only by the tests that need one."""
    from ubc_ocean.synthetic import generate

    cfg = tiny_config(tmp_path_factory.mktemp("tiny"))
    generate(cfg)
    return cfg


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Tiny tensors run fastest (and steadiest on a busy machine) on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
