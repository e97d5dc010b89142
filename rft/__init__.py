"""rft: reward finetuning of generative models in JAX/Flax."""


def _map_the_checkouts_configs() -> None:
  """Makes `rft.configs` (the config files and their shared helpers, configs/common.py)
  importable when rft runs from a checkout on PYTHONPATH.

  setup.py maps the repository's configs/ to the package rft.configs: a wheel installs it
  as rft/configs/ and an editable install maps it through its import finder. A checkout
  that is only on sys.path has neither (and another checkout's editable install would map
  its own folder), so the configs/ beside this package are mapped here.
  """
  import importlib.machinery
  import importlib.util
  import os
  import sys
  package = os.path.dirname(os.path.abspath(__file__))
  folder = os.path.join(os.path.dirname(package), "configs")
  if ("rft.configs" in sys.modules or os.path.isdir(os.path.join(package, "configs"))
      or not os.path.isdir(folder)):
    return  # already imported, a wheel's rft/configs, or not a checkout
  spec = importlib.machinery.ModuleSpec("rft.configs", None, is_package=True)
  spec.submodule_search_locations = [folder]
  sys.modules["rft.configs"] = importlib.util.module_from_spec(spec)


_map_the_checkouts_configs()
