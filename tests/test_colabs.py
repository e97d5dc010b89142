"""Every notebook in colabs/ runs top to bottom in a Jupyter kernel (nbclient), opened from
colabs/ as Colab would open it from a checkout, in smoke mode (RFT_NOTEBOOK_SMOKE=1: the
shortest version of each cell; a tiny diffusers SD folder where real weights are needed)."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import JAX_CACHE, ROOT, xla_flags

NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "colabs")) if f.endswith(".ipynb"))


def test_the_expected_notebooks_exist():
  assert set(NOTEBOOKS) >= {"shapes_quickstart.ipynb", "prdp_tables.ipynb", "grpo.ipynb",
                            "real_sd.ipynb"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
  monkeypatch.setenv("RFT_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("RFT_REPRO_WORKDIR", str(tmp_path / "repro"))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
  monkeypatch.setenv("PYTHONPATH", ROOT)
  monkeypatch.setenv("XLA_FLAGS", xla_flags())  # the kernel compiles like a subprocess run
  nb = nbformat.read(os.path.join(ROOT, "colabs", name), as_version=4)
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(ROOT, "colabs")}})
  client.execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
  assert "smoke: True" in text  # the setup cell found the checkout from colabs/
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
