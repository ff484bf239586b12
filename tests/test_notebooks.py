"""Notebooks stay in step with the package: every code cell compiles and every package import resolves."""

from __future__ import annotations

import ast
import json

import pytest

from tests.builders import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_cells_compile_and_imports_resolve(path):
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    sources = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert sources
    namespace: dict = {}
    for source in sources:
        tree = ast.parse(source, filename=path.name)
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ubc_ocean"):
                exec(compile(ast.Module([node], []), path.name, "exec"), namespace)
