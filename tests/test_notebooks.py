"""The example notebooks, executed with nbclient on the Shared GPU kernel (real broker, sshd)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.pool import Pool

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(pool: Pool, name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    km = pool.kernel_manager("shared-gpu")
    client = NotebookClient(nb, km=km, timeout=120, kernel_name="shared-gpu")
    try:
        client.execute()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb


def text_of(cell: nbformat.NotebookNode) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


@pytest.mark.parametrize("name", ["getting-started.ipynb", "class-exercise.ipynb"])
def test_example_notebook_runs_on_the_pool(pool: Pool, name: str):
    nb = execute(pool, name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(o.output_type != "error" for c in code for o in c.outputs)
    if name == "getting-started.ipynb":
        assert "host: host" in text_of(code[0])
        assert "slot: host" in text_of(code[0])
    else:
        assert "correct!" in text_of(code[-1])


def test_suspend_resume_notebook_frees_the_gpu_and_keeps_the_variables(pool: Pool):
    nb = execute(pool, "suspend-resume.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert text_of(code[0]).strip() == "285"
    assert "Suspended:" in text_of(code[1])
    resumed = text_of(code[2])
    assert "Resumed on" in resumed
    assert resumed.strip().splitlines()[-1] == "285 (2, 4)"
