"""launch/local.py prints the exact command and passes overrides through."""
import shlex
import subprocess
import sys

from tests.helpers import ROOT


def test_local_dry_run_prints_exact_command():
  out = subprocess.run([sys.executable, "launch/local.py", "--config=configs/pretrain_shapes.py:smoke",
                        "--workdir=/tmp/x", "--config.steps=3", "--python=python3", "--dry_run"],
                       cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
  assert shlex.split(out) == ["python3", "-m", "rft.main",
                              "--config=configs/pretrain_shapes.py:smoke", "--workdir=/tmp/x",
                              "--config.steps=3"]
