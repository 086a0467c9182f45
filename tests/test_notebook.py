"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from needs import need

nbformat = need("nbformat")
nbclient = need("nbclient")
need("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
KERNEL = "runmap-test-python"
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def kernel_for_this_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec that runs this very interpreter (the project's venv), whatever is on PATH."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "runmap test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return KERNEL


def _text(output: Any) -> str:
    if output.output_type == "stream":
        return str(output.text)
    return str(output.get("data", {}).get("text/plain", ""))


def test_quickstart_notebook_runs(kernel_for_this_interpreter: str) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_for_this_interpreter,
        timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(_text(o) for o in outputs)
    assert str([n**n for n in range(1, 9)]) in text
    assert "['Hello, Ada!', 'Hello, Grace!', 'Hello, Barbara!']" in text
    assert "caught: TooBig('5 is too big')" in text
    assert "[1, 2, TooBig('5 is too big')]" in text
    assert "[4, 27, 256]" in text  # top-level await
    assert "3125 [1, 4, 27]" in text  # rm.Executor
    widgets = [o for o in outputs if WIDGET in o.get("data", {})]
    assert widgets, "the progress bar should be a notebook widget (tqdm.auto)"
