"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel, so it cannot rot."""
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's run folder lands here
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "\n".join(str(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "epoch 2: test accuracy" in text and "true class:" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the curves
    assert list(tmp_path.glob("trainrig-quickstart-*/smoke/checkpoints/best.pt"))
