"""Tests for the ShapesWorld text-to-image model: TextEncoder, UNet, TextToImage."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft.models.t2i import TextToImage, make_encode_fn, make_eps_fn
from rft.models.text_encoder import TextEncoder, masked_attention
from rft.models.unet import GroupNorm, UNet, timestep_embedding

# A shrunk model (same structure: 3 levels, cross-attn at 8x8 and 4x4) keeps compile
# times short; the default config is checked separately where it matters.
SMALL = dict(channels=(16, 32, 32), emb_dim=32, text_width=32, num_groups=4,
             text_depth=1)
L = 12


def _count(params):
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))


def _tokens(rows, length=L):
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return jnp.asarray(out)


def _perturb_output(params, seed=0):
  """Replace the zero-init output conv by random values so the output shows the net."""
  params = jax.tree.map(lambda a: a, params)  # copy the containers
  conv = dict(params["unet"]["conv_out"])
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  conv["kernel"] = 0.1 * jax.random.normal(k1, conv["kernel"].shape)
  conv["bias"] = 0.1 * jax.random.normal(k2, conv["bias"].shape)
  unet = dict(params["unet"])
  unet["conv_out"] = conv
  return {**params, "unet": unet}


@pytest.fixture(scope="module")
def small():
  model = TextToImage(**SMALL)
  x = jnp.zeros((2, 16, 16, 3))
  t = jnp.array([0, 999])
  tok = _tokens([[3, 4, 5], [6]])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x, t, tok)["params"]
  apply = jax.jit(model.apply)
  return model, params, apply


@pytest.fixture(scope="module")
def small_perturbed(small):
  model, params, apply = small
  return model, _perturb_output(params), apply


def _x(b, res=16, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, res, res, 3))


def test_default_param_count_and_structure():
  model = TextToImage()
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                          jnp.zeros((1,), jnp.int32), jnp.ones((1, L), jnp.int32))
  params = shapes["params"]
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


def test_default_model_zero_output_at_init_16_and_32():
  model = TextToImage()
  tok = _tokens([[1, 2, 3], []])
  params = model.init(jax.random.PRNGKey(0), _x(2), jnp.array([3, 500]), tok)["params"]
  for res in (16, 32):
    eps = model.apply({"params": params}, _x(2, res), jnp.array([3, 500]), tok)
    assert eps.shape == (2, res, res, 3)
    assert float(jnp.max(jnp.abs(eps))) == 0.0  # zero-init output conv


def test_shapes_16_and_32(small_perturbed):
  model, params, apply = small_perturbed
  tok = _tokens([[3, 4, 5], [6, 7], [8]])
  for res in (16, 32):
    eps = apply({"params": params}, _x(3, res), jnp.array([1, 10, 100]), tok)
    assert eps.shape == (3, res, res, 3)
    assert bool(jnp.all(jnp.isfinite(eps)))
    assert float(jnp.std(eps)) > 1e-3


def test_bad_shapes_raise(small):
  model, params, _ = small
  with pytest.raises(ValueError, match="divisible by 4"):
    model.apply({"params": params}, _x(1, 18), jnp.array([1]), _tokens([[1]]))
  with pytest.raises(ValueError, match="max_len"):
    model.apply({"params": params}, _x(1), jnp.array([1]), _tokens([[1]], length=13))


def test_output_depends_on_t_and_text(small_perturbed):
  model, params, apply = small_perturbed
  x = jnp.tile(_x(1), (2, 1, 1, 1))
  v = {"params": params}
  tok = _tokens([[3, 4, 5], [3, 4, 5]])
  same = apply(v, x, jnp.array([100, 100]), tok)
  np.testing.assert_allclose(same[0], same[1], atol=1e-6)
  d_t = apply(v, x, jnp.array([100, 700]), tok)
  assert float(jnp.max(jnp.abs(d_t[0] - d_t[1]))) > 1e-3
  d_text = apply(v, x, jnp.array([100, 100]), _tokens([[3, 4, 5], [3, 9, 5]]))
  assert float(jnp.max(jnp.abs(d_text[0] - d_text[1]))) > 1e-3
  # Word order matters too (position embeddings + attention), not just the word bag.
  d_order = apply(v, x, jnp.array([100, 100]), _tokens([[3, 4, 5], [5, 4, 3]]))
  assert float(jnp.max(jnp.abs(d_order[0] - d_order[1]))) > 1e-4


def test_pad_masking(small_perturbed):
  """Whatever sits at pad positions never reaches the output."""
  model, params, apply = small_perturbed
  v = {"params": params}
  x, t = _x(2), jnp.array([50, 400])
  rows = [[3, 4, 5, 6], [7]]
  ref = apply(v, x, t, _tokens(rows, length=12))
  # 1) Same tokens, different amount of trailing padding.
  for length in (4, 7):
    out = apply(v, x, t, _tokens(rows, length=length))
    np.testing.assert_allclose(out, ref, atol=1e-5)
  # 2) Same tokens, garbage text states at the padded positions.
  states, mask = model.apply(v, _tokens(rows), method=TextToImage.encode)
  assert mask.tolist()[1] == [True] + [False] * 11
  garbage = jnp.where(mask[..., None], states,
                      100.0 * jax.random.normal(jax.random.PRNGKey(3), states.shape))
  out = model.apply(v, x, t, garbage, mask, method=TextToImage.denoise)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # ... while changing a real position's state does change the output (the test can fail).
  out = model.apply(v, x, t, states.at[1, 0].add(1.0), mask, method=TextToImage.denoise)
  assert float(jnp.max(jnp.abs(out[1] - ref[1]))) > 1e-4
  # 3) The encoder's states at real positions do not depend on the padding either.
  s4, _ = model.apply(v, _tokens(rows, length=4), method=TextToImage.encode)
  np.testing.assert_allclose(s4, states[:, :4], atol=1e-5)


def test_empty_prompt_finite_and_length_independent(small_perturbed):
  model, params, apply = small_perturbed
  v = {"params": params}
  x, t = _x(2), jnp.array([5, 900])
  empty = jnp.zeros((2, L), jnp.int32)
  states, mask = model.apply(v, empty, method=TextToImage.encode)
  assert bool(jnp.all(jnp.isfinite(states))) and not bool(jnp.any(mask))
  out = apply(v, x, t, empty)
  assert bool(jnp.all(jnp.isfinite(out)))
  # With no real token the UNet sees no text at all: independent of L and of states.
  np.testing.assert_allclose(apply(v, x, t, jnp.zeros((2, 3), jnp.int32)), out, atol=1e-5)
  junk = model.apply(v, x, t, jax.random.normal(jax.random.PRNGKey(0), states.shape),
                     mask, method=TextToImage.denoise)
  np.testing.assert_allclose(junk, out, atol=1e-5)
  # ... and the conditional output differs from the unconditional one.
  cond = apply(v, x, t, _tokens([[3, 4], [5]]))
  assert float(jnp.max(jnp.abs(cond - out))) > 1e-3
  # Gradients through an all-pad batch are finite too.
  g = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, empty) ** 2))(params)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))


def test_masked_attention_fully_masked_rows():
  q = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 2, 4))
  k = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 2, 4))
  mask = jnp.array([[True, False, True], [False, False, False]])
  out = masked_attention(q, k, k, mask)
  assert bool(jnp.all(out[1] == 0.0))
  # Row 0 equals attention over its two valid keys only.
  ref = masked_attention(q[:1], k[:1, ::2], k[:1, ::2], None)
  np.testing.assert_allclose(out[:1], ref, atol=1e-6)
  g = jax.grad(lambda q: jnp.sum(masked_attention(q, k, k, mask)))(q)
  assert bool(jnp.all(jnp.isfinite(g)))


def test_eps_and_encode_fns_agree_with_module(small_perturbed):
  model, params, _ = small_perturbed
  tok = _tokens([[3, 4, 5], []])
  x, t = _x(2), jnp.array([10, 20])
  encode, eps_fn = make_encode_fn(model), make_eps_fn(model)
  cond = jax.jit(encode)(params, tok)
  assert set(cond) == {"states", "mask"}
  assert cond["states"].shape == (2, L, SMALL["text_width"])
  assert cond["mask"].dtype == jnp.bool_
  direct_states, direct_mask = model.apply({"params": params}, tok,
                                           method=TextToImage.encode)
  np.testing.assert_allclose(cond["states"], direct_states, atol=1e-6)
  np.testing.assert_array_equal(cond["mask"], direct_mask)
  eps = jax.jit(eps_fn)(params, x, t, cond)
  np.testing.assert_allclose(eps, model.apply({"params": params}, x, t, tok), atol=1e-5)


def test_jit_grad_finite_and_reaches_every_part(small_perturbed):
  model, params, _ = small_perturbed
  encode, eps_fn = make_encode_fn(model), make_eps_fn(model)
  x0, noise = _x(4, seed=2), _x(4, seed=3)
  tok = _tokens([[3, 4], [5, 6, 7], [], [8]])
  t = jnp.array([1, 250, 500, 999])

  @jax.jit
  def loss_grad(p):
    def loss(p):
      x_t = 0.8 * x0 + 0.6 * noise
      return jnp.mean((eps_fn(p, x_t, t, encode(p, tok)) - noise) ** 2)
    return jax.value_and_grad(loss)(p)

  loss, g = loss_grad(params)
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves_with_path(g)
  assert all(bool(jnp.all(jnp.isfinite(a))) for _, a in leaves)
  norm = lambda tree: float(sum(jnp.sum(a ** 2) for a in jax.tree.leaves(tree)))
  for part in (g["text"], g["unet"]["conv_in"], g["unet"]["down1_attn0"],
               g["unet"]["mid_attn"], g["unet"]["t_fc1"], g["unet"]["text_pool_proj"]):
    assert norm(part) > 0.0


def test_zero_init_gives_gradient_only_to_output_conv(small):
  model, params, _ = small
  x, t, tok = _x(2), jnp.array([3, 4]), _tokens([[1], [2]])
  g = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, tok)))(params)
  assert float(jnp.sum(jnp.abs(g["unet"]["conv_out"]["bias"]))) > 0
  assert float(jnp.sum(jnp.abs(g["unet"]["conv_in"]["kernel"]))) == 0.0


def test_groupnorm_matches_flax():
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 32)) + 1.0
  ref = nn.GroupNorm(8)
  params = ref.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.PRNGKey(2), a.shape),
                        params)
  np.testing.assert_allclose(GroupNorm(8).apply(params, x), ref.apply(params, x),
                             atol=1e-4)


def test_timestep_embedding_distinguishes_steps():
  e = timestep_embedding(jnp.array([0, 1, 999]), 64)
  assert e.shape == (3, 64)
  assert float(jnp.min(jnp.abs(e[0] - e[1]).max())) > 1e-3
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
  tok = _tokens([[1, 2], []], length=6)
  (states, mask), _ = enc.init_with_output(jax.random.PRNGKey(0), tok)
  assert states.shape == (2, 6, 16) and mask.shape == (2, 6)
  assert bool(jnp.all(jnp.isfinite(states)))
  unet = UNet(channels=(8, 16), attn_levels=(1,), self_attn_levels=(), num_groups=4,
              emb_dim=16, num_heads=2)
  eps, _ = unet.init_with_output(jax.random.PRNGKey(0), _x(2, 8), jnp.array([1, 2]),
                                 states, mask)
  assert eps.shape == (2, 8, 8, 3)
