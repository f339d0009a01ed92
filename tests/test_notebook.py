"""The notebook: committed without outputs and with short cells, and runs top to bottom headless.

The headless run uses a kernel on this Python (the project's .venv), EDTOOLS_SMOKE=1: demo data, tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "edtools.ipynb"
nbformat = pytest.importorskip("nbformat")


def install_kernelspec() -> None:
    """A python3 kernelspec for this Python in the sandboxed JUPYTER_DATA_DIR (the venv's runs `python`)."""
    folder = Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels" / "python3"
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (edtools)",
        "language": "python",
    }
    (folder / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")


def test_notebook_is_committed_without_outputs_and_with_short_cells():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, (
            f"outputs not stripped: {cell.source[:60]}"
        )
        assert len(cell.source.splitlines()) <= 15, f"cell longer than 15 lines: {cell.source[:60]}"
    for before, cell in zip(notebook.cells, notebook.cells[1:], strict=False):
        if cell.cell_type == "code":
            assert before.cell_type == "markdown", f"code cell without a line of prose: {cell.source[:60]}"
    first = notebook.cells[0].source
    assert "colab.research.google.com/github/" in first and "notebooks/edtools.ipynb" in first
    install = code[0].source
    assert 'find_spec("edtools") is None' in install
    # edtools alone first, then its dependencies with every installed package that fits kept (Colab's torch)
    assert '"--no-deps"' in install and '"edtools.install", "train", "notebook"' in install


@pytest.mark.slow
@pytest.mark.notebook
def test_notebook_runs_top_to_bottom_in_smoke_mode(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for module in ("edtools.train", "edtools.config", "edtools.models"):
        pytest.importorskip(module, reason=f"{module} is needed to train in the notebook")
    install_kernelspec()
    monkeypatch.setenv("EDTOOLS_SMOKE", "1")
    monkeypatch.delenv("EDTOOLS_DATA_ROOT", raising=False)
    shutil.copy(NOTEBOOK, tmp_path / "edtools.ipynb")
    notebook = nbformat.read(tmp_path / "edtools.ipynb", as_version=4)
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "import json\n"
            "print(json.dumps({'events': [e.kind for e in training.events], 'total': balance.totals.value,"
            " 'error': str(training.error), 'rows': len(balance.rows)}))"
        )
    )
    started = time.perf_counter()
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    elapsed = time.perf_counter() - started
    print(f"notebook ran in {elapsed:.1f} s")
    assert elapsed < 300

    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    summary = json.loads(notebook.cells[-1].outputs[-1]["text"])
    assert summary["error"] == "None"
    assert summary["rows"] == 5  # the demo data root's folders
    assert summary["total"].startswith("Total: 96 images/epoch")
    kinds = summary["events"]
    assert kinds.count("epoch") == 2 and kinds[-1] == "end" and "step" in kinds and "sample" in kinds
    assert (tmp_path / "edtools_demo" / "data").is_dir()
    assert (tmp_path / "edtools_demo" / "tiny-model" / "model_index.json").is_file()
    assert any((tmp_path / "edtools_demo" / "run").rglob("model_index.json")), "no checkpoint written"
