"""Data builders shared by the tests: configs, images, MIL bags and small MIL models.

Test modules import builders from here; ``conftest.py`` holds only fixtures (which use these builders).
Every builder is deterministic: the same arguments give the same data. Torch and the MIL models are imported
by the builders that use them: a worker process that a test spawns imports this module, and should not pay
for torch unless it uses it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyvips

from ubc_ocean.config import Config, load_config

if TYPE_CHECKING:
    import torch

    from ubc_ocean.mil import MILModel

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- configs

# The demo config small enough for the whole pipeline to run in well under a minute on 2 CPU cores.
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


# The tiny config with one small MIL model trained briefly: stage 05 needs checkpoints, not good ones.
LEAN = ("mil.models=[abmil]", "mil.epochs=1", "mil.seeds=[0]")


def tiny_overrides(data_root: Path, *extra: str) -> list[str]:
    """Command-line overrides that shrink the demo config and write everything under ``data_root``."""
    return [*TINY_OVERRIDES, f"paths.data_root={data_root}", f"paths.submissions={data_root / 'submissions'}", *extra]


def tiny_config(data_root: Path, *extra: str) -> Config:
    """The demo config shrunk for tests, writing everything under ``data_root``."""
    return load_config(REPO / "configs" / "demo.yaml", tiny_overrides(data_root, *extra))


# A tiny run with every model that draws a heatmap its own way: attention (ABMIL, DSMIL), instance scores
# (Chowder), gradient x input (TransMIL).
TINY_RUN_OVERRIDES = [
    "mil.models=[abmil,dsmil,chowder,transmil]",
    "mil.model_options={transmil: {hidden_dim: 32, heads: 4}, abmil: {hidden_dim: 64, attention_dim: 32}, "
    "dsmil: {hidden_dim: 32, query_dim: 16}, chowder: {n_top: 3, n_bottom: 3, hidden_dims: [16]}}",
]


def tiny_run_config(data_root: Path, *extra: str) -> Config:
    """The config of :func:`build_tiny_run`'s run under ``data_root``."""
    return tiny_config(data_root, *TINY_RUN_OVERRIDES, *extra)


def build_tiny_run(data_root: Path, *extra: str) -> Config:
    """Stages 00-06 in-process on the tiny config with ``TINY_RUN_OVERRIDES``, everything under
    ``data_root``; returns the config. About as long as the end-to-end pipeline test."""
    from ubc_ocean.external.stage import run as merge
    from ubc_ocean.features.stage import run as embed
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train
    from ubc_ocean.submit.stage import run as submit
    from ubc_ocean.synthetic import run as make_data
    from ubc_ocean.tiling.stage import run as tile

    cfg = tiny_run_config(data_root, *extra)
    for stage in (make_data, tile, merge, embed, train, infer, submit):
        stage(cfg)
    return cfg


def default_config(data_root: Path, *extra: str) -> Config:
    """The package defaults (no YAML file) with the data under ``data_root``, plus ``extra`` overrides."""
    return load_config(None, [f"paths.data_root={data_root}", *extra])


# Stage 00 alone, on the package defaults: one WSI and one TMA per class, smaller than TINY_OVERRIDES' slides.
TINY_SYNTHETIC_OVERRIDES = [
    "synthetic.wsi_width=[400,500]",
    "synthetic.wsi_height=[300,380]",
    "synthetic.tma_sides=[256,300]",
    "synthetic.wsi_per_class=1",
    "synthetic.tma_per_class=1",
    "synthetic.test_images=6",
    "synthetic.test_other=2",
    "synthetic.test_tma_fraction=0.5",
    "synthetic.external_tiff_slides=2",
    "synthetic.external_patch_slides=2",
    "synthetic.external_patches_per_slide=3",
    "synthetic.thumbnail_max_side=128",
    "synthetic.workers=1",
    "tiling.tile_size=64",
]


def tiny_synthetic_config(root: Path, *extra: str) -> Config:
    """The package defaults shrunk for the stage 00 tests, everything (relative paths included) under ``root``."""
    return load_config(None, overrides=[f"paths.data_root={root}", *TINY_SYNTHETIC_OVERRIDES, *extra], root=root)


# ------------------------------------------------------------------------------------------------ scripts


def run_script(name: str, *args: str, monkeypatch: Any, capsys: Any) -> tuple[int, str, str]:
    """``python scripts/<name> <args>`` from the repository root, run in this process (whose torch and timm are
    loaded already: a new interpreter spends seconds importing them): (exit status, stdout, stderr). For
    scripts whose output the test reads from stdout and stderr; logging goes to pytest's capture."""
    import runpy
    import sys

    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # the benchmarks import one another, as scripts do
    monkeypatch.setattr(sys, "argv", [name, *args])
    monkeypatch.chdir(REPO)
    try:
        runpy.run_path(str(REPO / "scripts" / name), run_name="__main__")
        code = 0
    except SystemExit as stopped:
        code = stopped.code if isinstance(stopped.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ shared data


def built_once(tmp_path_factory: Any, name: str, build: Callable[[Path], object]) -> Path:
    """The folder ``name`` of this test run, made by ``build(folder)`` once for the whole run: under
    pytest-xdist the first worker that asks builds it while the others wait on a file lock, then every
    worker reads the same folder (a build that raised is retried by the next one to ask). Treat it as
    read-only; a test that writes works on a copy."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base folder, above every worker's own
    folder, built = root / name, root / f"{name}.built"
    with FileLock(root / f"{name}.lock"):
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            built.touch()
    return folder


# ----------------------------------------------------------------------------------------------- images


def write_png(path: Path, rgb: np.ndarray) -> Path:
    """Write ``rgb`` ([H, W, 3] or [H, W], uint8) as a PNG at ``path`` (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pyvips.Image.new_from_array(rgb).pngsave(str(path))
    return path


def write_plain_tiff(path: Path, rgb: np.ndarray, rows_per_strip: int = 7, compression: str | None = None) -> Path:
    """Write ``rgb`` as a plain RGB TIFF in strips of ``rows_per_strip`` lines: no tiles, no pyramid, no
    resolution (as histolab's kidney-48-5.tif; openslide refuses it). Returns ``path``."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, rgb, photometric="rgb", rowsperstrip=rows_per_strip, compression=compression)
    return path


def read_rgb(path: Path) -> np.ndarray:
    """An image file's pixels as a [H, W, bands] array, through libvips."""
    return pyvips.Image.new_from_file(str(path)).numpy()


# ------------------------------------------------------------------------------------------------- bags

MIL_IN_DIM = 32
MIL_N_CLASSES = 3


def separable_bags(
    n_bags: int, seed: int = 0, in_dim: int = MIL_IN_DIM, n_classes: int = MIL_N_CLASSES
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Bags with a planted signal: 10-29 standard-normal noise instances plus 2-4 instances at 0.3 noise
    around ``4 * e_label``, shuffled; labels cycle ``0, 1, ..., n_classes - 1``. Float32, torch RNG."""
    import torch

    g = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.eye(n_classes, in_dim)
    bags, labels = [], []
    for i in range(n_bags):
        label = i % n_classes
        n_noise = int(torch.randint(10, 30, (1,), generator=g))
        n_signal = int(torch.randint(2, 5, (1,), generator=g))
        signal = means[label] + 0.3 * torch.randn(n_signal, in_dim, generator=g)
        bag = torch.cat([torch.randn(n_noise, in_dim, generator=g), signal])
        bags.append(bag[torch.randperm(len(bag), generator=g)])
        labels.append(label)
    return bags, torch.tensor(labels)


def class_centre_bags(
    n_per_class: int, n_classes: int = 3, dim: int = 16, seed: int = 0
) -> tuple[list[torch.Tensor], list[int]]:
    """Bags as the training stage stores them (float16): 8-29 standard-normal instances, the first quarter
    (at least 2) shifted by a random class centre (the same centres for every seed); labels grouped by class."""
    import torch

    centres = np.random.default_rng(123).normal(size=(n_classes, dim)) * 3
    rng = np.random.default_rng(seed)
    bags, labels = [], []
    for label in range(n_classes):
        for _ in range(n_per_class):
            size = int(rng.integers(8, 30))
            bag = rng.normal(size=(size, dim))
            bag[: max(2, size // 4)] += centres[label]
            bags.append(torch.tensor(bag, dtype=torch.float16))
            labels.append(label)
    return bags, labels


# ----------------------------------------------------------------------------------------------- models

# Options that make each registered MIL model small enough for fast CPU tests; a model without an entry
# is built with its defaults.
SMALL_MIL_OPTIONS: dict[str, dict[str, Any]] = {
    "abmil": {"hidden_dim": 64},
    "meanpool": {"hidden_dim": 64},
    "transmil": {"hidden_dim": 64},
    "dsmil": {"hidden_dim": 32, "query_dim": 16},
    "chowder": {"n_top": 3, "n_bottom": 3, "hidden_dims": [16]},
    "panther": {"n_prototypes": 4, "hidden_dim": 32},
}


def small_mil_model(name: str, seed: int = 0, **options: Any) -> MILModel:
    """Registered model ``name`` with ``SMALL_MIL_OPTIONS`` (``options`` override them), ``MIL_IN_DIM`` in,
    ``MIL_N_CLASSES`` out, its weights drawn after ``torch.manual_seed(seed)``."""
    import torch

    from ubc_ocean.mil import create_mil_model

    torch.manual_seed(seed)
    return create_mil_model(name, MIL_IN_DIM, MIL_N_CLASSES, **{**SMALL_MIL_OPTIONS.get(name, {}), **options})
