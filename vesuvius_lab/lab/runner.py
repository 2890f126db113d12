"""Run a notebook top to bottom with injected parameters (papermill-style, without papermill),
through nbclient, the executor behind ``jupyter nbconvert --execute``.

The notebook's cell tagged ``parameters`` holds the defaults; a cell tagged
``injected-parameters`` is placed right after it with the caller's values, so the notebook runs
small in tests and full size by hand. Execution uses the ``python3`` kernel of this environment.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"


def inject_parameters(nb: nbformat.NotebookNode, parameters: dict) -> nbformat.NotebookNode:
    """Put ``name = repr(value)`` lines in a cell after the parameters cell (replacing an earlier one)."""
    cells = [c for c in nb.cells if INJECTED_TAG not in c.metadata.get("tags", [])]
    index = next((i for i, c in enumerate(cells) if PARAMETERS_TAG in c.metadata.get("tags", [])), None)
    if index is None:
        raise ValueError(f"notebook has no cell tagged {PARAMETERS_TAG!r} to inject parameters after")
    source = "# Injected parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in parameters.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})
    nb.cells = cells[: index + 1] + [injected] + cells[index + 1 :]
    return nb


def run_notebook(
    path: str | Path,
    parameters: dict | None = None,
    timeout: int = 120,
    cwd: str | Path | None = None,
    kernel_name: str = "python3",
) -> nbformat.NotebookNode:
    """Execute a notebook (cwd: its own folder by default) and return it with its outputs.

    A failing cell raises ``nbclient.exceptions.CellExecutionError`` with the cell's traceback.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    if parameters:
        inject_parameters(nb, parameters)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name, resources={"metadata": {"path": str(cwd or path.parent)}}
    )
    client.execute()  # as `jupyter nbconvert --execute` does; the notebooks' Qt loop is lab.qt.start_qt
    return nb
