"""Tests for the ShapesWorld text-to-image model: TextEncoder, UNet, TextToImage."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft.models.t2i import TextToImage, make_encode_fn, make_eps_fn
from rft.models.text_encoder import TextEncoder, masked_attention
from rft.models.unet import GroupNorm, UNet, timestep_embedding

# A shrunk model keeps compile times short (2 levels: 16x16, and 8x8 with self- and
# cross-attention); every check below reuses a handful of
# jitted functions with one batch shape (B=4, L=12) so each compiles once. The default
# config is checked abstractly (eval_shape) where it matters.
SMALL = dict(channels=(8, 16), attn_levels=(1,), self_attn_levels=(1,), mid_attn=False,
             emb_dim=32, text_width=32, num_groups=4, text_depth=1, num_heads=2,
             text_heads=2)
B, L = 4, 12
# Tests check semantics, not speed: skip XLA's backend optimisations (~2x faster compile).
_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def _count(params):
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))


def _tokens(rows, length=L):
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return jnp.asarray(out)


def _x(b=B, res=16, seed=1):
  # numpy RNG: eager jax.random would compile once per shape.
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((b, res, res, 3)), jnp.float32)


def _normal(shape, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _perturb_output(params, seed=0):
  """Replace the zero-init output conv by random values so the output shows the net."""
  conv = params["unet"]["conv_out"]
  conv = {"kernel": _normal(conv["kernel"].shape, seed, 0.1),
          "bias": _normal(conv["bias"].shape, seed + 1, 0.1)}
  return {**params, "unet": {**params["unet"], "conv_out": conv}}


class Small:
  """The small model, its params (as initialised, and with a random output conv) and
  jitted entry points."""

  def __init__(self):
    self.model = model = TextToImage(**SMALL)
    # An "rbg" key: XLA compiles its bit generator faster than threefry (~2x init).
    self.params = _jit(model.init)(jax.random.key(0, impl="rbg"), _x(),
                                      jnp.arange(B), _tokens([[3, 4, 5]] * B))["params"]
    self.pparams = _perturb_output(self.params)
    self.fwd = _jit(lambda p, x, t, tok: model.apply({"params": p}, x, t, tok))
    self.encode = _jit(make_encode_fn(model))
    self.eps = _jit(make_eps_fn(model))
    encode, eps_fn = make_encode_fn(model), make_eps_fn(model)

    def loss(p, x0, noise, t, tok):
      x_t = 0.8 * x0 + 0.6 * noise
      return jnp.mean((eps_fn(p, x_t, t, encode(p, tok)) - noise) ** 2)

    self.loss_grad = _jit(jax.value_and_grad(loss))


@pytest.fixture(scope="module")
def small():
  return Small()


def test_default_config_params_and_shapes():
  model = TextToImage()
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                            jnp.zeros((1,), jnp.int32), jnp.ones((1, L), jnp.int32))
  params = abstract["params"]
  n = _count(params)
  assert 0.8e6 <= n <= 1.2e6, n
  assert set(params) == {"text", "unet"}
  # Cross-attention at 8x8 (level 1) and 4x4 (level 2), none at 16x16 (level 0).
  unet_keys = set(params["unet"])
  assert {"down1_attn0", "down2_attn0", "up1_attn0", "up2_attn0", "mid_attn"} <= unet_keys
  assert not any(k.startswith(("down0_attn", "up0_attn")) for k in unet_keys)
  assert "self_attn" in params["unet"]["down2_attn0"]
  assert "self_attn" not in params["unet"]["down1_attn0"]
  assert params["text"]["tok_embed"]["embedding"].shape == (64, 64)
  assert params["unet"]["conv_out"]["kernel"].shape == (3, 3, 32, 3)
  # Resolution-agnostic: the same params serve 16x16 and 32x32.
  for res in (16, 32):
    out = jax.eval_shape(lambda p, x: model.apply(p, x, jnp.zeros((2,)),
                                                  jnp.ones((2, L), jnp.int32)),
                         abstract, jnp.zeros((2, res, res, 3)))
    assert out.shape == (2, res, res, 3) and out.dtype == jnp.float32


def test_zero_init_output(small):
  eps = small.fwd(small.params, _x(), jnp.array([0, 3, 500, 999]),
                  _tokens([[1, 2, 3], [], [4], [5, 6]]))
  assert eps.shape == (B, 16, 16, 3)
  assert float(np.max(np.abs(eps))) == 0.0


def test_shapes_16_and_32(small):
  tok = _tokens([[3, 4, 5], [6, 7], [8], []])
  t = jnp.array([1, 10, 100, 999])
  for res in (16, 32):
    eps = small.fwd(small.pparams, _x(res=res), t, tok)
    assert eps.shape == (B, res, res, 3)
    assert bool(np.all(np.isfinite(eps)))
    assert float(np.std(eps)) > 1e-3


def test_bad_shapes_raise(small):
  v = {"params": small.params}
  with pytest.raises(ValueError, match="divisible by 2"):
    jax.eval_shape(lambda x: small.model.apply(v, x, jnp.ones(1), _tokens([[1]])),
                   jnp.zeros((1, 17, 16, 3)))
  with pytest.raises(ValueError, match="max_len"):
    jax.eval_shape(lambda tok: small.model.apply(v, _x(1), jnp.ones(1), tok),
                   jnp.ones((1, 13), jnp.int32))


def test_output_depends_on_t_and_text(small):
  x = jnp.tile(_x(1), (B, 1, 1, 1))
  a, b, a_rev = [3, 4, 5], [3, 9, 5], [5, 4, 3]
  out = small.fwd(small.pparams, x, jnp.array([100, 700, 100, 100]),
                  _tokens([a, a, b, a_rev]))
  assert _maxdiff(out[0], out[1]) > 1e-3  # t
  assert _maxdiff(out[0], out[2]) > 1e-3  # one word
  assert _maxdiff(out[0], out[3]) > 1e-4  # word order (same bag of words)
  # Rows are independent: the same inputs in another batch give the same output.
  again = small.fwd(small.pparams, x, jnp.array([100, 1, 2, 3]), _tokens([a, b, b, b]))
  np.testing.assert_allclose(again[0], out[0], atol=1e-5)


def test_pad_masking(small):
  """Whatever sits at pad positions never reaches the output."""
  rows = [[3, 4, 5, 6], [7], [8, 9], [10, 11, 12]]
  tok = _tokens(rows)
  x, t = _x(), jnp.array([50, 400, 600, 999])
  cond = small.encode(small.pparams, tok)
  mask = cond["mask"]
  assert mask.tolist()[1] == [True] + [False] * (L - 1)
  ref = small.eps(small.pparams, x, t, cond)
  # 1) The encoder's real-position states do not depend on the amount of padding.
  short = small.encode(small.pparams, tok[:, :4])
  np.testing.assert_allclose(short["states"], cond["states"][:, :4], atol=1e-5)
  np.testing.assert_array_equal(short["mask"], mask[:, :4])
  # 2) Garbage text states at the padded positions do not change the UNet's output.
  noise = _normal(cond["states"].shape, 3, 100.0)
  garbage = {"states": jnp.where(mask[..., None], cond["states"], noise), "mask": mask}
  np.testing.assert_allclose(small.eps(small.pparams, x, t, garbage), ref, atol=1e-5)
  # ... while changing a real position's state does (so this test can fail).
  moved = {"states": cond["states"].at[1, 0].add(1.0), "mask": mask}
  out = small.eps(small.pparams, x, t, moved)
  assert _maxdiff(out[1], ref[1]) > 1e-4
  np.testing.assert_allclose(out[0], ref[0], atol=1e-5)


def test_empty_prompt(small):
  x, t = _x(), jnp.array([5, 900, 5, 900])
  tok = _tokens([[], [], [3, 4], [5]])
  cond = small.encode(small.pparams, tok)
  assert bool(np.all(np.isfinite(cond["states"])))
  assert not bool(np.any(cond["mask"][:2]))
  out = small.eps(small.pparams, x, t, cond)
  assert bool(np.all(np.isfinite(out)))
  # No real token: the UNet sees no text at all (any states give the same output).
  junk = {"states": _normal(cond["states"].shape, 0),
          "mask": cond["mask"]}
  np.testing.assert_allclose(small.eps(small.pparams, x, t, junk)[:2], out[:2],
                             atol=1e-5)
  # ... and conditional differs from unconditional at the same x, t.
  uncond = small.eps(small.pparams, x, t, small.encode(small.pparams, _tokens([[]] * B)))
  assert _maxdiff(out[2:], uncond[2:]) > 1e-3
  np.testing.assert_allclose(uncond[:2], out[:2], atol=1e-5)


def test_masked_attention_fully_masked_rows():
  q, k = _normal((2, 5, 2, 4), 0), _normal((2, 3, 2, 4), 1)
  mask = jnp.array([[True, False, True], [False, False, False]])

  @jax.jit
  def run(q, k):
    out = masked_attention(q, k, k, mask)
    ref = masked_attention(q[:1], k[:1, ::2], k[:1, ::2], None)
    g = jax.grad(lambda q: jnp.sum(masked_attention(q, k, k, mask)))(q)
    return out, ref, g

  out, ref, g = run(q, k)
  assert bool(np.all(np.asarray(out[1]) == 0.0))
  np.testing.assert_allclose(out[:1], ref, atol=1e-6)  # only the valid keys count
  assert bool(np.all(np.isfinite(g)))


def test_eps_and_encode_fns_agree_with_module(small):
  tok = _tokens([[3, 4, 5], [], [6], [7, 8]])
  x, t = _x(), jnp.array([10, 20, 30, 40])
  cond = small.encode(small.pparams, tok)
  assert set(cond) == {"states", "mask"}
  assert cond["states"].shape == (B, L, SMALL["text_width"])
  assert cond["mask"].dtype == jnp.bool_
  states, mask = _jit(lambda p, tok: small.model.apply(
      {"params": p}, tok, method=TextToImage.encode))(small.pparams, tok)
  np.testing.assert_allclose(cond["states"], states, atol=1e-6)
  np.testing.assert_array_equal(cond["mask"], mask)
  np.testing.assert_allclose(small.eps(small.pparams, x, t, cond),
                             small.fwd(small.pparams, x, t, tok), atol=1e-5)


def _grad_inputs():
  return (_x(seed=2), _x(seed=3), jnp.array([1, 250, 500, 999]),
          _tokens([[3, 4], [5, 6, 7], [], [8]]))  # includes an empty prompt


def test_jit_grad_finite_and_reaches_every_part(small):
  loss, g = small.loss_grad(small.pparams, *_grad_inputs())
  g = jax.device_get(g)  # numpy from here: no per-leaf eager compiles
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(g))
  norm = lambda tree: float(sum(np.sum(a ** 2) for a in jax.tree.leaves(tree)))
  u = g["unet"]
  for part in (g["text"], u["conv_in"], u["down1_attn0"]["cross_attn"],
               u["down1_attn0"]["self_attn"], u["mid_res0"], u["t_fc1"],
               u["text_pool_proj"], u["conv_out"]):
    assert norm(part) > 0.0


def test_zero_init_gives_gradient_only_to_output_conv(small):
  _, g = small.loss_grad(small.params, *_grad_inputs())
  g = jax.device_get(g)
  assert float(np.sum(np.abs(g["unet"]["conv_out"]["kernel"]))) > 0
  rest = {k: v for k, v in g["unet"].items() if k != "conv_out"}
  assert all(float(np.max(np.abs(a))) == 0.0 for a in jax.tree.leaves(rest))
  assert all(float(np.max(np.abs(a))) == 0.0 for a in jax.tree.leaves(g["text"]))


def test_groupnorm_matches_flax():
  x = _normal((2, 8, 8, 32), 0, 3.0) + 1.0
  ref = nn.GroupNorm(8)
  params = {"params": {"scale": _normal((32,), 1), "bias": _normal((32,), 2)}}
  ours, theirs = _jit(lambda p, x: (GroupNorm(8).apply(p, x), ref.apply(p, x)))(
      params, x)
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_timestep_embedding_distinguishes_steps():
  e = timestep_embedding(jnp.array([0, 1, 999]), 64)
  assert e.shape == (3, 64)
  assert _maxdiff(e[0], e[1]) > 1e-3 and _maxdiff(e[1], e[2]) > 1e-3
  np.testing.assert_allclose(timestep_embedding(jnp.array([7.0]), 64),
                             timestep_embedding(jnp.array([7]), 64))


def test_from_config_and_hashable():
  m = TextToImage.from_config(text={"vocab_size": 40, "width": 32},
                              unet={"channels": [16, 32, 32], "num_groups": 4})
  assert m.vocab_size == 40 and m.text_width == 32 and m.channels == (16, 32, 32)
  assert hash(m) == hash(TextToImage(**m.config()))
  with pytest.raises(ValueError, match="unet.'chanels'"):
    TextToImage.from_config(unet={"chanels": (8, 16)})
  with pytest.raises(ValueError, match="text.'widht'"):
    TextToImage.from_config(text={"widht": 8})


def test_standalone_modules():
  enc = TextEncoder(vocab_size=20, max_len=6, width=16, depth=1, num_heads=2)
  tok = jnp.ones((2, 6), jnp.int32)
  (states, mask), vs = jax.eval_shape(enc.init_with_output, jax.random.PRNGKey(0), tok)
  assert states.shape == (2, 6, 16) and mask.shape == (2, 6) and mask.dtype == jnp.bool_
  unet = UNet(channels=(8, 16), attn_levels=(1,), self_attn_levels=(), num_groups=4,
              emb_dim=16, num_heads=2, out_channels=4)
  eps, _ = jax.eval_shape(unet.init_with_output, jax.random.PRNGKey(0), _x(2, 8),
                          jnp.ones((2,)), states, mask)
  assert eps.shape == (2, 8, 8, 4)


def test_pos_emb_option_adds_one_table_per_attention_block_and_moves_the_output():
  """pos_emb=False keeps the parameter tree of the shipped base; True adds a [H*W, C]
  table to each attention block (at its resolution), and the tables change the output."""
  cfg = dict(SMALL, mid_attn=True, vocab_size=16)
  x, t = jnp.ones((2, 16, 16, 3)), jnp.array([10, 500])
  tokens = jnp.ones((2, 12), jnp.int32)
  plain = _jit(TextToImage(**cfg).init)(jax.random.key(0), x, t, tokens)["params"]
  model = TextToImage(**cfg, pos_emb=True)
  params = _jit(model.init)(jax.random.key(0), x, t, tokens)["params"]
  tables = {"/".join(str(getattr(p, "key", p)) for p in path): v.shape
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
            if str(getattr(path[-1], "key", "")) == "pos_emb"}
  assert tables == {"unet/down1_attn0/pos_emb": (64, 16), "unet/mid_attn/pos_emb": (64, 16),
                    "unet/up1_attn0/pos_emb": (64, 16)}
  n_plain = sum(v.size for v in jax.tree.leaves(plain))
  assert sum(v.size for v in jax.tree.leaves(params)) == n_plain + 3 * 64 * 16
  # Give the zero-init output conv weights so the output can move at all.
  params["unet"]["conv_out"]["kernel"] = 0.1 * jnp.ones_like(params["unet"]["conv_out"]["kernel"])
  apply = _jit(model.apply)
  out = apply({"params": params}, x, t, tokens)
  shuffled = jax.tree_util.tree_map_with_path(
      lambda p, v: v[::-1] if str(getattr(p[-1], "key", "")) == "pos_emb" else v, params)
  assert not np.allclose(np.asarray(out), np.asarray(apply({"params": shuffled}, x, t, tokens)))
