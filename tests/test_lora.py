"""Tests for rft.models.lora: LoRA as a transform of plain param pytrees."""

import functools
import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft.models import lora
from rft.models.t2i import TextToImage

B, L, RES = 2, 12, 16
# Semantics, not speed: skip XLA's backend optimisations (faster compiles).
_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})

MODEL = TextToImage.from_config(
    text={"width": 32, "depth": 1, "num_heads": 2, "vocab_size": 31},
    unet={"channels": (16, 32, 32), "emb_dim": 32})
ATTN = r"attn/(q|k|v|out)/kernel$"


def _normal(shape, seed, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def params():
  p = _jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, RES, RES, 3)),
                       jnp.zeros((1,), jnp.int32), jnp.zeros((1, L), jnp.int32))["params"]
  # conv_out is zero-initialised, which would make the output independent of every
  # other weight; randomise it so gradients reach the LoRA factors.
  conv = p["unet"]["conv_out"]
  conv = {"kernel": _normal(conv["kernel"].shape, 1, 0.1),
          "bias": _normal(conv["bias"].shape, 2, 0.1)}
  return {**p, "unet": {**p["unet"], "conv_out": conv}}


@pytest.fixture(scope="module")
def inputs():
  x = _normal((B, RES, RES, 3), 3)
  t = jnp.asarray([10, 500], jnp.int32)
  tokens = jnp.asarray(np.random.default_rng(4).integers(1, 31, (B, L)), jnp.int32)
  return x, t, tokens


@_jit
def _forward(p, x, t, tokens):
  return MODEL.apply({"params": p}, x, t, tokens)


def _shapes(tree):
  return {p: tuple(v.shape) for p, v in lora._flatten(tree).items()}


# ---------------------------------------------------------------------------- paths


def test_param_paths_and_regex_selection(params):
  paths = lora.param_paths(params)
  assert len(paths) == len(jax.tree.leaves(params)) == len(set(paths))
  assert "unet/down1_attn0/cross_attn/q/kernel" in paths
  assert "text/block0/attn/out/bias" in paths
  assert "unet/conv_in/kernel" in paths

  lr = lora.init(params, jax.random.PRNGKey(0), 2, ATTN)
  # Independent selection: every q/k/v/out kernel of a text/self/cross attention.
  expected = [p for p in paths if p.count("/") >= 2
              and p.split("/")[-3] in ("attn", "self_attn", "cross_attn")
              and p.split("/")[-2] in ("q", "k", "v", "out") and p.endswith("/kernel")]
  assert list(lr) == expected
  # text: 1 block x 4; unet: cross at down1/up1 (4 each), self+cross at down2/mid/up2 (8 each).
  assert len(expected) == 4 + 2 * 4 + 3 * 8
  # Several regexes are OR-ed; a str is one regex.
  lr2 = lora.init(params, jax.random.PRNGKey(0), 2,
                  [r"^text/.*attn/q/kernel$", "conv_in/kernel"])
  assert list(lr2) == ["text/block0/attn/q/kernel", "unet/conv_in/kernel"]


def test_default_targets(params):
  lr = lora.init(params, jax.random.PRNGKey(0), 2, lora.DEFAULT_TARGETS)
  assert all(p.startswith("unet/") and p.endswith("/kernel") for p in lr)
  assert "unet/mid_attn/self_attn/v/kernel" in lr
  assert "unet/up2_attn0/cross_attn/out/kernel" in lr
  assert "unet/down1_res0/conv1/kernel" in lr and "unet/up0_res0/conv2/kernel" in lr
  assert not any("text/" in p or "norm" in p or "emb_proj" in p for p in lr)
  n_attn = sum("_attn/" in p for p in lr)
  n_conv = sum(p.endswith(("conv1/kernel", "conv2/kernel")) for p in lr)
  assert n_attn == 32 and n_conv == 2 * 8 and len(lr) == n_attn + n_conv


# ----------------------------------------------------------------------------- init


def test_init_shapes_values_and_determinism(params):
  key = jax.random.PRNGKey(7)
  lr = lora.init(params, key, 4, [ATTN, r"conv1/kernel$"])
  base = lora._flatten(params)
  for p, ab in lr.items():
    fan_in, fan_out = math.prod(base[p].shape[:-1]), base[p].shape[-1]
    assert ab["a"].shape == (fan_in, 4) and ab["b"].shape == (4, fan_out), p
    assert ab["a"].dtype == ab["b"].dtype == jnp.float32
    assert not np.any(np.asarray(ab["b"]))
  conv = lr["unet/down1_res0/conv1/kernel"]["a"]
  assert conv.shape == (3 * 3 * 16, 4)
  # a ~ N(0, 1/fan_in): pool the standardised entries of all factors.
  z = np.concatenate([np.asarray(ab["a"]).ravel() * math.sqrt(ab["a"].shape[0])
                      for ab in lr.values()])
  assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05
  # Deterministic in (key, path): same key -> same tree, independent of other targets;
  # different paths / keys -> different draws.
  again = lora.init(params, key, 4, ATTN)
  for p in again:
    np.testing.assert_array_equal(again[p]["a"], lr[p]["a"])
  a_q = np.asarray(lr["unet/mid_attn/self_attn/q/kernel"]["a"])
  a_k = np.asarray(lr["unet/mid_attn/self_attn/k/kernel"]["a"])
  assert not np.allclose(a_q, a_k)
  other = lora.init(params, jax.random.PRNGKey(8), 4, ATTN)
  assert not np.allclose(other["unet/mid_attn/self_attn/q/kernel"]["a"], a_q)
  # Only shapes are read: abstract params give the same tree structure.
  abstract = jax.eval_shape(lambda: params)
  assert _shapes(lora.init(abstract, key, 4, ATTN)) == _shapes(again)


def test_num_params(params):
  rank = 3
  lr = lora.init(params, jax.random.PRNGKey(0), rank, lora.DEFAULT_TARGETS)
  base = lora._flatten(params)
  expected = sum(rank * (math.prod(base[p].shape[:-1]) + base[p].shape[-1]) for p in lr)
  assert lora.num_params(lr) == expected
  assert lora.num_params(params) == sum(int(np.size(x)) for x in jax.tree.leaves(params))
  assert lora.num_params({"a": np.zeros((2, 3)), "b": {"c": np.zeros(5)}}) == 11
  assert lora.num_params(lr) < lora.num_params(params)


def test_serialisation_roundtrip(params):
  lr = lora.init(params, jax.random.PRNGKey(0), 2, ATTN)
  back = flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(lr))
  assert list(back) == list(lr)
  jax.tree.map(np.testing.assert_array_equal, back, lr)


# ---------------------------------------------------------------------------- merge


def test_merge_at_init_is_identity(params, inputs):
  lr = lora.init(params, jax.random.PRNGKey(0), 4, lora.DEFAULT_TARGETS + (ATTN,))
  merged = lora.merge(params, lr, alpha=8.0, rank=4)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  flat_m, flat_b = lora._flatten(merged), lora._flatten(params)
  for p, w in flat_b.items():
    if p in lr:
      np.testing.assert_array_equal(flat_m[p], w)
      assert flat_m[p].dtype == w.dtype
    else:
      assert flat_m[p] is w, p  # untouched leaves are the same objects
  out_base = _forward(params, *inputs)
  out_merged = _forward(merged, *inputs)
  assert np.array_equal(np.asarray(out_base), np.asarray(out_merged))
  # ...and a nonzero b does change the output (so the check above can fail).
  lr_b = {p: {"a": ab["a"], "b": ab["b"] + 0.05} for p, ab in lr.items()}
  out_b = _forward(lora.merge(params, lr_b, alpha=8.0, rank=4), *inputs)
  assert float(jnp.max(jnp.abs(out_b - out_base))) > 1e-3


def test_merge_hand_computed():
  rng = np.random.default_rng(0)
  w_dense = rng.standard_normal((3, 5)).astype(np.float32)
  w_conv = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
  bias = rng.standard_normal((5,)).astype(np.float32)
  base = {"dense": {"kernel": w_dense, "bias": bias}, "conv": {"kernel": w_conv}}
  rank, alpha = 2, 3.0
  a_d, b_d = rng.standard_normal((3, 2)), rng.standard_normal((2, 5))
  a_c, b_c = rng.standard_normal((12, 2)), rng.standard_normal((2, 4))
  lr = {"dense/kernel": {"a": jnp.asarray(a_d, jnp.float32), "b": jnp.asarray(b_d, jnp.float32)},
        "conv/kernel": {"a": jnp.asarray(a_c, jnp.float32), "b": jnp.asarray(b_c, jnp.float32)}}
  merged = lora.merge(base, lr, alpha=alpha, rank=rank)
  scale = alpha / rank
  np.testing.assert_allclose(merged["dense"]["kernel"], w_dense + scale * a_d @ b_d,
                             rtol=1e-5, atol=1e-5)
  # Conv kernel [kh, kw, in, out] as a [kh*kw*in, out] matrix (C order).
  delta = np.einsum("ir,ro->io", a_c, b_c).reshape(2, 2, 3, 4)
  np.testing.assert_allclose(merged["conv"]["kernel"], w_conv + scale * delta,
                             rtol=1e-5, atol=1e-5)
  # Element-wise spot check of the reshape convention: W'[h, w, i, o] uses row h*6+w*3+i.
  h, w_, i, o = 1, 0, 2, 3
  row = h * 2 * 3 + w_ * 3 + i
  assert np.isclose(merged["conv"]["kernel"][h, w_, i, o],
                    w_conv[h, w_, i, o] + scale * a_c[row] @ b_c[:, o], atol=1e-5)
  assert merged["dense"]["bias"] is bias
  # Scale is alpha / rank, not alpha.
  half = lora.merge(base, lr, alpha=alpha / 2, rank=rank)
  np.testing.assert_allclose(half["dense"]["kernel"] - w_dense,
                             0.5 * (merged["dense"]["kernel"] - w_dense), rtol=1e-5, atol=1e-6)


def test_merge_grad_hand_computed():
  """d/d(a, b) of sum(W' * C): da = s C b^T, db = s a^T C (C flattened to a matrix)."""
  rng = np.random.default_rng(1)
  w = rng.standard_normal((2, 3, 4)).astype(np.float32)
  c = rng.standard_normal((2, 3, 4)).astype(np.float32)
  a = rng.standard_normal((6, 2)).astype(np.float32)
  b = rng.standard_normal((2, 4)).astype(np.float32)
  s = 5.0 / 2
  g = jax.grad(lambda lr: jnp.sum(lora.merge({"w": w}, lr, 5.0, 2)["w"] * c))(
      {"w": {"a": jnp.asarray(a), "b": jnp.asarray(b)}})
  cm = c.reshape(6, 4)
  np.testing.assert_allclose(g["w"]["a"], s * cm @ b.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g["w"]["b"], s * a.T @ cm, rtol=1e-5, atol=1e-5)


def test_grad_through_model_at_init(params, inputs):
  x, t, tokens = inputs
  target = _normal((B, RES, RES, 3), 5)
  lr = lora.init(params, jax.random.PRNGKey(0), 2, lora.DEFAULT_TARGETS)

  def loss(lr, base):
    out = MODEL.apply({"params": lora.merge(base, lr, 2.0, 2)}, x, t, tokens)
    return jnp.mean((out - target) ** 2)

  # Only the LoRA tree is differentiated; the base is a constant argument.
  grad_fn = _jit(jax.grad(loss))
  grads = grad_fn(lr, params)
  assert jax.tree.structure(grads) == jax.tree.structure(lr)
  for p, g in grads.items():
    assert np.all(np.isfinite(g["b"])), p
    assert float(jnp.max(jnp.abs(g["b"]))) > 0, f"zero b-grad at {p}"
    assert not np.any(np.asarray(g["a"])), f"nonzero a-grad at init at {p}"
  # After a step on b, a gets gradient too, and the loss moves.
  stepped = {p: {"a": ab["a"], "b": ab["b"] - 1.0 * grads[p]["b"]} for p, ab in lr.items()}
  grads2 = grad_fn(stepped, params)
  assert any(np.any(np.asarray(g["a"])) for g in grads2.values())
  loss_fn = _jit(loss)
  assert float(loss_fn(stepped, params)) < float(loss_fn(lr, params))


# --------------------------------------------------------------------------- errors


def test_error_regex_matches_nothing(params):
  with pytest.raises(ValueError, match=r"attn/qkv/kernel.*matches no param path") as e:
    lora.init(params, jax.random.PRNGKey(0), 2, [ATTN, r"attn/qkv/kernel"])
  # Shows available paths from across the tree, not just the first few.
  assert "'text/" in str(e.value) and "'unet/" in str(e.value)


def test_error_ndim_below_two(params):
  with pytest.raises(ValueError,
                     match=r"'text/block0/attn/out/bias' with shape \(32,\)"):
    lora.init(params, jax.random.PRNGKey(0), 2, r"text/block0/attn/out/")


@pytest.mark.parametrize("rank", [0, -1])
def test_error_rank(params, rank):
  with pytest.raises(ValueError, match="rank"):
    lora.init(params, jax.random.PRNGKey(0), rank, ATTN)
  with pytest.raises(ValueError, match="rank"):
    lora.merge(params, {}, 1.0, rank)


def test_error_merge_mismatch():
  base = {"w": np.zeros((3, 4), np.float32)}
  good = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((2, 4))}
  with pytest.raises(ValueError, match="'v' is not in the base"):
    lora.merge(base, {"v": good}, 1.0, 2)
  with pytest.raises(ValueError, match="'w'"):
    lora.merge(base, {"w": good}, 1.0, 3)  # rank disagrees with the factors
