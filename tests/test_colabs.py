"""Every notebook in colabs/ runs top to bottom (code cells, install lines skipped)."""
import json
import os

import pytest

from tests.helpers import ROOT, run_python

NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "colabs")) if f.endswith(".ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
  nb = json.load(open(os.path.join(ROOT, "colabs", name)))
  code = []
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      src = "".join(cell["source"])
      code.append("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))))
  p = run_python(["-c", "\n".join(code)], timeout=900)
  assert "alignment" in p.stdout
