"""``examples/robust_vs_standard.ipynb`` (issue 19 §2): stored without outputs, and it runs.

The slow test executes the notebook with nbclient on the ``python3`` kernel (the interpreter
running pytest when ipykernel is installed in it, as in ``.venv``), in a temporary working
directory, and checks that no cell raised and that every cell tagged ``figure`` showed at least
one image. It skips, with the reason, when nbclient/nbformat or a ``python3`` kernel is missing.
About a minute or two on two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "robust_vs_standard.ipynb"
KERNEL = "python3"
# the figures the notebook must show: evaluation, sensitivity, the AdaptGrad grid, the metrics
N_FIGURE_CELLS = 4


def _figure_cells(nb) -> list:
    return [c for c in nb["cells"]
            if c["cell_type"] == "code" and "figure" in c.get("metadata", {}).get("tags", [])]


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [], f"code cell {i} is stored with outputs"
        assert cell.get("execution_count") is None, f"code cell {i} has an execution count"
    assert len(_figure_cells(nb)) == N_FIGURE_CELLS
    assert nb["metadata"]["kernelspec"]["name"] == KERNEL


def _kernel_or_skip() -> None:
    pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[dev]')")
    pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[dev]')")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.skip(f"no Jupyter kernel named {KERNEL!r} (pip install ipykernel)")


@pytest.mark.slow
def test_notebook_runs_and_shows_its_figures(tmp_path):
    _kernel_or_skip()
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=600, startup_timeout=120,
                            allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    assert all(c.execution_count is not None for c in code), "a code cell did not run"

    figure_cells = _figure_cells(nb)
    assert len(figure_cells) == N_FIGURE_CELLS
    for cell in figure_cells:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"no image from the figure cell:\n{cell.source}"
