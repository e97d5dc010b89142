"""Analysis command lines: `python -m rft.tools.noise_scale` (gradient noise scale of
PRDP), `python -m rft.tools.method_table` (the method table from finished workdirs)."""
