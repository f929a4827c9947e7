"""Every notebook in notebooks/ runs top to bottom on the nbparallel kernel, and its checks pass.

A code cell tagged ``check`` holds asserts about the results above it; every notebook needs at
least one. A cell tagged ``raises-exception`` shows an error on purpose, so it must raise one.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 600


def _tagged(nb: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def _errors(cell: nbformat.NotebookNode) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for o in cell.get("outputs", []) if o.output_type == "error"]


@pytest.mark.cluster
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    checks = _tagged(nb, "check")
    assert checks, f"{path.name} has no code cell tagged 'check', so nothing in it is asserted"

    # Raises CellExecutionError, naming the cell, on any error outside a raises-exception cell.
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="nbparallel",
                   resources={"metadata": {"path": str(path.parent)}}).execute()

    for cell in checks:
        assert cell.execution_count is not None, f"check cell did not run:\n{cell.source}"
        assert not _errors(cell), f"check cell failed: {_errors(cell)}\n{cell.source}"
    for cell in _tagged(nb, "raises-exception"):
        assert _errors(cell), f"cell tagged raises-exception did not raise:\n{cell.source}"
