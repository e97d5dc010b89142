"""Launchers of rft jobs: local.py (this machine), slurm.py (GPU clusters), tpu_pod.py
(Cloud TPU VM pods). In a checkout they run as `python launch/<name>.py`; a wheel installs
them as the package rft.launch (`python -m rft.launch.<name>`)."""
