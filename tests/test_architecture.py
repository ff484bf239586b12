"""Imports go one way, down the layers.

Between packages, import-linter enforces the contracts in ``pyproject.toml`` (``[tool.importlinter]``: the
layers of DESIGN.md, the stages' independence, a base that imports no stage, stages 00-02 and 06 without
torch, prediction without the adaptation code); ``make test`` runs ``lint-imports`` and the tests below show
that it holds and that a planted upward import breaks it. Within packages, the ``ast`` checks here keep modules
that are not entry points (a top-level ``run(cfg)``) below the layout: the benchmark runner -> entry points ->
layout -> library -> base. Read from the source (nothing is imported), so a new module is checked the day it is
added.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "ubc_ocean"
BASE = {"ubc_ocean", "ubc_ocean.config", "ubc_ocean.io_utils", "ubc_ocean.parallel", "ubc_ocean.device",
        "ubc_ocean.memory", "ubc_ocean.metrics"}
FRONT_DOOR = "ubc_ocean.cli"
ORCHESTRATOR = "ubc_ocean.benchmark.runner"  # above the stages, as the scripts are: it calls each stage's run
LAYOUT = "ubc_ocean.layout"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(), str(path)) for path in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The project modules that ``name`` imports (``from ubc_ocean.x import y`` counts ``ubc_ocean.x.y``
    when that is a module, else ``ubc_ocean.x``)."""
    modules, found = _modules(), set()
    for node in ast.walk(modules[name]):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("ubc_ocean")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ubc_ocean"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found - {name}


def _is_entry_point(name: str) -> bool:
    """A module with a top-level ``run(cfg)``: a stage, or a tool a script opens (focus calibration, LOCO)."""
    return any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in _modules()[name].body)


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


@cache
def _layer(name: str) -> int:
    if name == ORCHESTRATOR:
        return 4
    if name in BASE:
        return 0
    if name == LAYOUT:
        return 2
    if name == FRONT_DOOR or _is_entry_point(name):
        return 3
    if _is_package(name):  # a package's __init__ re-exports its modules: it sits where they sit
        return max([1, *(_layer(m) for m in _imports(name) if m.startswith(name + "."))])
    return 1  # library: slides, tiling, features, mil, outliers, sources, folds, synthetic helpers


MODULES = sorted(_modules())


def test_layers_are_recognised():
    stages = {name for name in MODULES if name.endswith(".stage")}
    assert len(stages) == 7 and all(_layer(name) == 3 for name in stages)
    assert _layer("ubc_ocean.mil.registry") == 1 and _layer("ubc_ocean.config") == 0
    # viz: pictures from arrays and files are library; what reads a run through layout is an entry point
    assert {_layer(f"ubc_ocean.viz.{m}") for m in ("overlay", "relevance", "slide", "cv", "html")} == {1}
    assert _layer("ubc_ocean.viz") == 1 and _layer("ubc_ocean.viz.report") == 3
    assert _layer(ORCHESTRATOR) == 4 and {_layer(f"ubc_ocean.benchmark.{m}") for m in ("stats", "report")} == {1}


@pytest.mark.parametrize("name", MODULES)
def test_imports_only_go_down(name):
    """A module imports only lower layers (a library may import its own layer: models use outlier scores;
    nothing imports the benchmark runner)."""
    layer = _layer(name)
    own = (lambda m: m.startswith(name + ".")) if _is_package(name) else (lambda m: False)
    upward = sorted(m for m in _imports(name)
                    if not own(m) and (_layer(m) > layer or (layer == 3 and _layer(m) == 3)))
    assert not upward, f"{name} (layer {layer}) imports {upward}"


def test_no_stage_imports_another_stage():
    offenders = {name: sorted(m for m in _imports(name) if m.endswith(".stage"))
                 for name in MODULES if name not in (FRONT_DOOR, ORCHESTRATOR)}
    assert not {name: found for name, found in offenders.items() if found}


def test_outliers_and_sources_stay_below_their_users():
    outliers = {m for name in MODULES if name.startswith("ubc_ocean.outliers") for m in _imports(name)}
    assert not {m for m in outliers if m.startswith("ubc_ocean.mil")}
    assert not {m for m in _imports("ubc_ocean.sources") if m.startswith("ubc_ocean.tiling")}


def _lint_imports(project: Path) -> subprocess.CompletedProcess:
    """import-linter's report on the package under ``project/src`` with ``project/pyproject.toml``'s contracts
    (a new interpreter: the ``ubc_ocean`` it reads is the one that folder holds)."""
    code = ("import sys; sys.path.insert(0, 'src'); from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120)


def _plant(path: Path, after: str, line: str) -> None:
    text = path.read_text()
    assert after in text, f"{path.name} no longer has {after!r}: plant the import elsewhere"
    path.write_text(text.replace(after, f"{after}{line}\n", 1))


def test_the_import_contracts_hold_and_a_planted_upward_import_breaks_them(tmp_path):
    kept = _lint_imports(ROOT)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "5 kept, 0 broken" in kept.stdout

    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(PACKAGE, tmp_path / "src" / "ubc_ocean", ignore=shutil.ignore_patterns("__pycache__"))
    planted = tmp_path / "src" / "ubc_ocean"
    _plant(planted / "layout.py", "from __future__ import annotations\n", "from ubc_ocean.mil import registry")
    _plant(planted / "tiling" / "tissue.py", "from __future__ import annotations\n", "import torch")
    _plant(planted / "submit" / "ensemble.py", "from __future__ import annotations\n",
           "from ubc_ocean.features import stage")
    _plant(planted / "kaggle" / "bundle.py", "from __future__ import annotations\n",
           "from ubc_ocean.adaptation import lora")
    broken = _lint_imports(tmp_path)
    report = " ".join(broken.stdout.split())  # the contract names are wrapped to the terminal's width
    assert broken.returncode == 1, report
    assert "0 kept, 5 broken" in report
    # each contract names the offending chain
    assert "ubc_ocean.layout -> ubc_ocean.mil.registry" in report
    assert "ubc_ocean.tiling.tissue -> torch" in report
    assert "ubc_ocean.submit.ensemble -> ubc_ocean.features.stage" in report
    assert "ubc_ocean.kaggle.bundle -> ubc_ocean.adaptation.lora" in report


def test_stages_00_to_02_and_06_and_the_decoders_load_neither_torch_nor_timm_nor_sklearn():
    """What every --workers process of those stages, and every stage-05 decoder process, pays: checked in a
    fresh interpreter."""
    modules = ["ubc_ocean.synthetic.generate", "ubc_ocean.tiling.stage", "ubc_ocean.external.stage",
               "ubc_ocean.submit.stage", "ubc_ocean.inference.decoding"]
    code = (f"import sys; import {', '.join(modules)}; "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'sklearn') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
