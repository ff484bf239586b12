"""Every notebook in notebooks/ runs top to bottom, in a real Jupyter kernel, on the tiny trained run of the
session (``tiny_run``), with a time limit per cell; the executed copy goes to a temporary folder. The
committed notebooks stay output-free and hold a ``parameters`` cell the tests replace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.builders import REPO, TINY_RUN_OVERRIDES, tiny_overrides

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # a single cell; the walkthrough's training cell is the longest
# The walkthrough runs stages 00-06 itself: on the tiny run's data (stages 00-03 find their work done) into
# an experiment and a submission of its own, so the other notebooks' run stays as the fixture built it.
WALKTHROUGH = ["experiment=walkthrough", "submit.name=walkthrough", "mil.models=[abmil]"]
# The adaptation notebook runs stage 02b itself when its encoder folder is empty: a few small steps.
ADAPTATION = ["adapt.name=notebook", "adapt.steps=4", "adapt.batch_size=8", "adapt.dino_out_dim=64",
              "adapt.local_crops=1", "adapt.local_crop_size=32", "adapt.log_every=2"]


def test_every_expected_notebook_is_there():
    names = {path.stem for path in NOTEBOOKS}
    assert {"01_data_overview", "02_tiling_qc", "03_cv_report", "04_attention_heatmaps", "05_error_analysis",
            "06_encoder_adaptation", "pipeline_walkthrough"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_output_free_with_a_parameters_cell(path):
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and "parameters" in code[0].get("metadata", {}).get("tags", [])
    dirty = [i for i, cell in enumerate(code) if cell.get("outputs") or cell.get("execution_count") is not None]
    assert not dirty, f"{path.name}: code cells {dirty} hold outputs; clear them before committing"


def _parameters(path: Path, data_root: Path) -> str:
    overrides = [*tiny_overrides(data_root), *TINY_RUN_OVERRIDES]
    if path.stem == "pipeline_walkthrough":
        overrides += WALKTHROUGH
    if path.stem == "06_encoder_adaptation":
        overrides += ADAPTATION
    return f"CONFIG = {str(REPO / 'configs' / 'demo.yaml')!r}\nOVERRIDES = {overrides!r}"


def _outputs(notebook) -> list[dict]:  # type: ignore[no-untyped-def]
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


@pytest.mark.long
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tiny_run, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = _parameters(path, Path(tiny_run.paths.data_root))
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    try:
        client.execute()  # raises CellExecutionError naming the cell on the first error
    finally:
        nbformat.write(notebook, tmp_path / path.name)
    outputs = _outputs(notebook)
    assert not [o for o in outputs if o.output_type == "error"]
    assert all(c.execution_count for c in notebook.cells if c.cell_type == "code")
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure shown"
