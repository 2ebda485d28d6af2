"""Both notebooks run headless (nbclient, this venv's python3 kernel) in FAST mode without a cell error.

FAST mode and the model are passed through the environment, which the kernel inherits and each notebook's
``parameters`` cell reads (WORKBENCH_NOTEBOOK_FAST, WORKBENCH_NOTEBOOK_MODEL). The embedded ShapesWorld model is used
when it has been exported (or the model WORKBENCH_NOTEBOOK_MODEL names); otherwise a micro random MoE model.
"""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EMBEDDED = ROOT / "models" / "shapesworld-moe"


@pytest.fixture(scope="module")
def notebook_model(tmp_path_factory) -> str:
    if os.environ.get("WORKBENCH_NOTEBOOK_MODEL"):
        return os.environ["WORKBENCH_NOTEBOOK_MODEL"]
    if (EMBEDDED / "model_index.json").is_file():
        return ""
    from workbench.loading import save_pipeline
    from workbench.shapesworld.model import ShapesWorldSpec, build_pipeline

    folder = tmp_path_factory.mktemp("micro_moe")
    save_pipeline(build_pipeline(ShapesWorldSpec.micro()), folder)
    return str(folder)


def run_notebook(name: str, model: str, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("WORKBENCH_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("WORKBENCH_NOTEBOOK_MODEL", model)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode, kind: str) -> list[str]:
    """All outputs of a mime type (or stream text for "stream") across the notebook's code cells."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if kind == "stream" and output.output_type == "stream":
                found.append(output.text)
            elif kind in output.get("data", {}):
                found.append(output["data"][kind])
    return found


@pytest.mark.parametrize("name", ["flow_trajectories.ipynb", "moe_routing.ipynb"])
def test_committed_notebook_is_clean_and_parameterised(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit notebooks cleared"
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell is the parameters cell"
    assert "FAST" in code[0].source and "WORKBENCH_NOTEBOOK_FAST" in code[0].source


@pytest.mark.slow
def test_flow_trajectories_notebook_runs(notebook_model, monkeypatch):
    notebook = run_notebook("flow_trajectories.ipynb", notebook_model, monkeypatch)
    text = "".join(outputs(notebook, "stream"))
    straightness = {
        line.split()[0]: float(line.split("=")[1]) for line in text.splitlines() if line.split()[:1] and " S = " in line
    }
    assert straightness["reflow"] < straightness["independent"]
    assert len(outputs(notebook, "image/png")) >= 10
    assert any("| sampler | steps | nfe |" in table for table in outputs(notebook, "text/markdown"))


@pytest.mark.slow
def test_moe_routing_notebook_runs(notebook_model, monkeypatch):
    notebook = run_notebook("moe_routing.ipynb", notebook_model, monkeypatch)
    markdown = outputs(notebook, "text/markdown")
    assert any("| condition |" in table and "expert 0 off" in table for table in markdown)
    assert any(table.startswith("Measured on") for table in markdown)
    assert len(outputs(notebook, "image/png")) >= 6
