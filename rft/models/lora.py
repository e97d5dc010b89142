"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a transform of plain param pytrees.

For each targeted weight ``W`` (a leaf with ``ndim >= 2``, viewed as a matrix
``[fan_in, fan_out]`` with ``fan_out = W.shape[-1]`` and ``fan_in = prod(W.shape[:-1])``,
so a conv kernel ``[kh, kw, in, out]`` is ``[kh*kw*in, out]``) LoRA trains two small
factors ``A [fan_in, r]`` and ``B [r, fan_out]`` and uses

    W' = W + (alpha / r) * A @ B          (reshaped back to W.shape)

``A ~ N(0, 1/fan_in)`` and ``B = 0`` at init, so ``W' == W`` exactly: the finetuned model
starts as the base model, and at init the gradient reaches ``B`` only (``dL/dA = 0``).

    lora = init(params, key, rank=4, targets=DEFAULT_TARGETS)   # {path: {"a", "b"}}
    loss = lambda lora: f(merge(params, lora, alpha=4.0, rank=4))
    grads = jax.grad(loss)(lora)                             # base params stay frozen

The base params are never modified or differentiated, so the *reference policy* (for KL
terms or reward baselines) is simply ``params`` itself -- the LoRA-zero model -- at no
extra memory: no second copy of the weights is needed.

The LoRA tree is a flat plain dict ``{"a/b/kernel": {"a": [fan_in, r], "b": [r, fan_out]}}``
of float32 arrays; it is a jax pytree and serialises with orbax / flax msgpack.
Paths are the ``"/"``-joined keys of the nested param dict (see ``param_paths``).
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Sensible targets for the ShapesWorld models (rft.models.t2i / rft.models.dit): the
# denoiser's self-/cross-attention projections and the UNet's residual-block 3x3 convs.
# The text encoder stays frozen.
DEFAULT_TARGETS = (
    r"^(unet|dit)/.*/(self_attn|cross_attn)/(q|k|v|out)/kernel$",
    r"^unet/.*_res\d+/conv[12]/kernel$",
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested mappings -> ``{"a/b/kernel": leaf}`` in traversal order."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
  return out


def param_paths(params: Any) -> list[str]:
  """``"a/b/kernel"``-style paths of all leaves of a nested param dict."""
  return list(_flatten(params))


def _fans(shape: Sequence[int]) -> tuple[int, int]:
  return int(math.prod(shape[:-1])), int(shape[-1])


def _check_rank(rank: int) -> None:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")


def init(params: Any, key: jax.Array, rank: int,
         targets: str | Sequence[str]) -> dict[str, dict[str, jax.Array]]:
  """LoRA factors ``{path: {"a": [fan_in, rank], "b": [rank, fan_out]}}``.

  A leaf is targeted when its path matches any regex in ``targets`` (``re.search``).
  ``a ~ N(0, 1/fan_in)`` (float32; depends only on ``key`` and the path), ``b = 0``.
  Only leaf shapes are read, so ``params`` may be ``jax.ShapeDtypeStruct``s.

  Raises ValueError if ``rank < 1``, if a regex matches no leaf, or if a matched leaf
  has ``ndim < 2``.
  """
  _check_rank(rank)
  if isinstance(targets, str):
    targets = [targets]
  targets = list(targets)
  if not targets:
    raise ValueError("LoRA targets is empty; give at least one path regex")
  flat = _flatten(params)
  compiled = []
  for t in targets:
    try:
      compiled.append(re.compile(t))
    except re.error as e:
      raise ValueError(f"LoRA target {t!r} is not a valid regex: {e}") from e
  for t, rx in zip(targets, compiled):
    if not any(rx.search(p) for p in flat):
      paths = list(flat)
      sample = paths[::max(1, len(paths) // 8)][:8]  # spread over the whole tree
      raise ValueError(
          f"LoRA target regex {t!r} matches no param path; {len(paths)} paths, e.g. "
          f"{sample}")
  lora = {}
  for path, leaf in flat.items():
    if not any(rx.search(path) for rx in compiled):
      continue
    shape = tuple(leaf.shape)
    if len(shape) < 2:
      raise ValueError(
          f"LoRA target matched {path!r} with shape {shape}; LoRA needs ndim >= 2 "
          f"(make the regex exclude it, e.g. end with 'kernel$')")
    fan_in, fan_out = _fans(shape)
    k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    a = jax.random.normal(k, (fan_in, rank), jnp.float32) / np.float32(math.sqrt(fan_in))
    lora[path] = {"a": a, "b": jnp.zeros((rank, fan_out), jnp.float32)}
  return lora


def merge(base: Any, lora: Mapping[str, Mapping[str, jax.Array]], alpha: float,
          rank: int) -> Any:
  """``base`` with ``W + (alpha/rank) * (a @ b).reshape(W.shape)`` at each LoRA path.

  Other leaves are returned as the same objects. Differentiable w.r.t. ``lora`` (and
  ``base``, though it is normally held constant). The result has ``W``'s dtype.
  """
  _check_rank(rank)
  scale = float(alpha) / rank
  flat = _flatten(base)
  for path, ab in lora.items():
    if path not in flat:
      raise ValueError(f"LoRA path {path!r} is not in the base params")
    shape = tuple(flat[path].shape)
    fan_in, fan_out = _fans(shape)
    a, b = ab["a"], ab["b"]
    if a.shape != (fan_in, rank) or b.shape != (rank, fan_out):
      raise ValueError(
          f"LoRA factors for {path!r} (shape {shape}) have a {tuple(a.shape)}, "
          f"b {tuple(b.shape)}; expected a {(fan_in, rank)}, b {(rank, fan_out)}")

  def rebuild(tree, prefix):
    if not isinstance(tree, Mapping):
      if prefix not in lora:
        return tree
      ab = lora[prefix]
      delta = jnp.matmul(ab["a"], ab["b"], precision=jax.lax.Precision.HIGHEST)
      return tree + (scale * delta).reshape(tree.shape).astype(tree.dtype)
    return {k: rebuild(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in tree.items()}

  return rebuild(base, "")


def num_params(tree: Any) -> int:
  """Total number of scalars in the leaves of ``tree``."""
  return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
