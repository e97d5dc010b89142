#!/usr/bin/env bash
# The paper tables T1, T2 and T5 on one accelerator (GPU or TPU host), back to back, with
# the `accelerator` preset of rft.repro. Results (table.md, table.csv, curves.png, grids/,
# summary.json per table) go under the workdir, default workdirs/repro:
#   launch/paper_tables_accelerator.sh [WORKDIR]
# Rerunning resumes interrupted runs and skips finished ones.
set -euo pipefail
# In a checkout, run from its root; installed with the package (rft/launch/), from here.
root="$(dirname "$0")/.."
if [ -f "$root/setup.py" ]; then cd "$root"; fi
WORKDIR=${1:-workdirs/repro}
python -c "import jax; print('devices:', jax.devices())"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m rft.repro prdp_table1,prdp_table2,prdp_table5 --preset accelerator --workdir "$WORKDIR"
