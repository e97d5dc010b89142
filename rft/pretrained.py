"""Small pretrained bundles shipped in the repo (rft/assets/) and loaded by name.

A bundle is `<name>.msgpack` (params, flax msgpack: no pickle) beside `<name>.json`
(what builds the module, the command that made it, and its measured numbers). A bundle's
folder may be local or not (a gs:// workdir): files go through rft.paths.
"""
from __future__ import annotations

import os
from typing import Any

from rft import checkpoint, paths

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# Where each shipped bundle comes from, for the error message when it is absent.
HOW_TO_MAKE = {
    "shapes_base": "python -m rft.main --config=configs/pretrain_shapes.py "
                   "--config.export_dir=rft/assets",
    "shapes_reward": "python -m rft.main --config=configs/scorers_shapes.py "
                     "--config.export_dir=rft/assets",
    "shapes_evaluator": "python -m rft.main --config=configs/scorers_shapes.py "
                        "--config.export_dir=rft/assets",
    "arith_base": "python -m rft.main --config=configs/pretrain_arith.py "
                  "--config.export_dir=rft/assets",
}


def invocation() -> str:
  """The command line of this process, as recorded in a bundle's metadata."""
  import sys
  argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith("main.py") else sys.argv
  return "python -m rft.main " + " ".join(argv)


def resolve_dir(directory: str | None) -> str:
  """The folder a bundle directory names: None, "" and "assets" are the shipped folder
  rft/assets; "assets/<sub>" is a bundle shipped in its subfolder (e.g.
  "assets/positions") unless a folder of that name exists here; anything else is a path."""
  if not directory or directory == "assets":
    return ASSETS
  if directory.startswith("assets/") and not os.path.isdir(directory):
    return os.path.join(ASSETS, directory[len("assets/"):])
  return directory


def bundle_paths(name: str, directory: str | None = None) -> tuple[str, str]:
  d = resolve_dir(directory)
  return os.path.join(d, f"{name}.msgpack"), os.path.join(d, f"{name}.json")


def exists(name: str, directory: str | None = None) -> bool:
  return all(paths.path(p).exists() for p in bundle_paths(name, directory))


def save_bundle(name: str, params: Any, meta: dict, directory: str | None = None) -> str:
  params_path, meta_path = bundle_paths(name, directory)
  checkpoint.save_params_file(params_path, params)
  paths.write_json(meta_path, meta, indent=2, sort_keys=True)
  return params_path


def export_bundle(name: str, params: Any, meta: dict, workdir: str, export_dir: str = "") -> None:
  """Save a trained bundle into the run's workdir, and into `export_dir` when given (e.g.
  rft/assets to refresh the shipped one)."""
  save_bundle(name, params, meta, workdir)
  if export_dir:
    save_bundle(name, params, meta, export_dir)


def load_meta(name: str, directory: str | None = None) -> dict:
  params_path, meta_path = bundle_paths(name, directory)
  if not paths.path(meta_path).exists() or not paths.path(params_path).exists():
    how = HOW_TO_MAKE.get(name, "")
    raise FileNotFoundError(
        f"pretrained bundle {name!r} not found: expected {params_path} and {meta_path}"
        + (f". Make it with: {how}" if how else ""))
  return paths.read_json(meta_path)


def load_bundle(name: str, template: Any = None, directory: str | None = None) -> tuple[Any, dict]:
  """(params, meta). With `template`, keys and shapes are checked against it."""
  meta = load_meta(name, directory)
  params = checkpoint.load_params_file(bundle_paths(name, directory)[0], template)
  return params, meta


def load_shapes_base(directory: str | None = None):
  """The shipped ShapesWorld base model: (module, params, meta).

  meta["model"]["family"] says which module: "unet" (rft.models.t2i.TextToImage, the
  default for bundles without it) or "dit" (rft.models.dit.TextToImageDiT, a rectified
  flow). meta["schedule"] and meta["sampler"] hold the noise schedule and the default
  sampler settings it was evaluated with (rft.diffusion.pipeline.world_pipeline builds
  its pipeline); meta["results"] its measured alignment.
  """
  import jax
  import jax.numpy as jnp

  from rft.models.dit import TextToImageDiT
  from rft.models.t2i import TextToImage

  meta = load_meta("shapes_base", directory)
  cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()}
  family = cfg.pop("family", "unet")
  families = {m.family: m for m in (TextToImage, TextToImageDiT)}
  if family not in families:
    raise ValueError(f"{directory or ASSETS}/shapes_base.json: model family {family!r}; "
                     f"known: {sorted(families)}")
  model = families[family](**cfg)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                            jnp.zeros((1,), jnp.int32),
                            jnp.zeros((1, model.max_len), jnp.int32))["params"]
  params, _ = load_bundle("shapes_base", template, directory)
  return model, params, meta


def load_arith_base(directory: str | None = None):
  """The shipped arithmetic-world LM: (LMConfig, params, meta).

  meta["world"] holds the ArithmeticWorld settings it was trained on; meta["results"] its
  measured exact-match accuracy.
  """
  import jax
  import jax.numpy as jnp

  from rft.models.lm import DecoderLM, LMConfig

  meta = load_meta("arith_base", directory)
  cfg = LMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()})
  dummy = jnp.zeros((1, 4), jnp.int32)
  template = jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0), dummy, dummy,
                            jnp.ones((1, 4), bool))["params"]
  params, _ = load_bundle("arith_base", template, directory)
  return cfg, params, meta
