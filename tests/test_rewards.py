"""Rewards: JPEG sizes, image statistics, combine/build, ShapesWorld alignment."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rft.data import shapes
from rft.rewards import base, image_stats, jpeg

NO_PROMPTS = {}


def _noise(seed=0, shape=(2, 32, 32, 3)):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _flat(value, shape=(2, 32, 32, 3)):
  return np.full(shape, value, np.float32)


def _pil_kb(u8, quality):
  buf = io.BytesIO()
  Image.fromarray(u8).save(buf, "JPEG", quality=quality)
  return len(buf.getvalue()) / 1000.0


# --------------------------------------------------------------------------- JPEG


@pytest.mark.parametrize("quality", [95, 50])
def test_jpeg_size_matches_independent_pil_encoding(quality):
  x = _noise(1, (3, 24, 20, 3))
  x[0] = 0.3  # one flat image, one with out-of-range values
  x[1] = x[1] * 1.5
  u8 = np.round(np.clip((x + 1) * 127.5, 0, 255)).astype(np.uint8)
  want = np.array([_pil_kb(im, quality) for im in u8], np.float32)
  r = base.build({"jpeg_incompressibility": 1.0}, quality=quality)
  got = r(jnp.asarray(x), NO_PROMPTS)  # jax input works too
  assert isinstance(got, np.ndarray) and got.shape == (3,) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert r.host and not r.differentiable


def test_jpeg_quality_changes_size():
  x = _noise(2)
  hi = jpeg.jpeg_incompressibility_reward(quality=95)(x, NO_PROMPTS)
  lo = jpeg.jpeg_incompressibility_reward(quality=10)(x, NO_PROMPTS)
  assert np.all(lo < hi)


def test_flat_grey_is_more_compressible_than_noise():
  comp = jpeg.jpeg_compressibility_reward()
  incomp = jpeg.jpeg_incompressibility_reward()
  flat, noise = _flat(0.0), _noise(3)
  assert np.all(incomp(flat, NO_PROMPTS) < incomp(noise, NO_PROMPTS))
  assert np.all(comp(flat, NO_PROMPTS) > comp(noise, NO_PROMPTS))
  # 32x32x3 noise at q=95 costs well over a kB (about 1.8); a flat image well under (~0.6).
  assert np.all(incomp(noise, NO_PROMPTS) > 1.5) and np.all(incomp(flat, NO_PROMPTS) < 1.0)


def test_compressibility_is_minus_incompressibility():
  x = np.concatenate([_noise(4), _flat(-0.5)])
  c = jpeg.jpeg_compressibility_reward()(x, NO_PROMPTS)
  i = jpeg.jpeg_incompressibility_reward()(x, NO_PROMPTS)
  np.testing.assert_array_equal(c, -i)
  assert np.all(i > 0)


def test_to_uint8_rounds_and_clips():
  x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0, -1 + 0.6 / 127.5], np.float32).reshape(1, 1, 2, 3)
  np.testing.assert_array_equal(jpeg.to_uint8(x).reshape(-1), [0, 0, 128, 255, 255, 1])


# --------------------------------------------------------------------------- image stats


def _img(rgb01, h=2, w=3):
  """An image [1, h, w, 3] in [-1, 1] of one colour given in [0, 1]."""
  return jnp.asarray(np.broadcast_to(np.asarray(rgb01, np.float32) * 2 - 1, (1, h, w, 3)))


@pytest.mark.parametrize("rgb, sat, lum", [
    ((1, 0, 0), 1.0, 0.299),
    ((0, 1, 0), 1.0, 0.587),
    ((0, 0, 1), 1.0, 0.114),
    ((1, 1, 0), 1.0, 0.886),
    ((0.5, 0.5, 0.5), 0.0, 0.5),
    ((1, 1, 1), 0.0, 1.0),
    ((0, 0, 0), 0.0, 0.0),
    ((1.0, 0.5, 0.25), 0.75, 0.299 + 0.5 * 0.587 + 0.25 * 0.114),
])
def test_image_stats_of_flat_colours(rgb, sat, lum):
  x = _img(rgb)
  np.testing.assert_allclose(image_stats.saturation(x), [sat], atol=1e-5)
  np.testing.assert_allclose(image_stats.brightness(x), [lum], atol=1e-5)


def test_image_stats_average_over_pixels_per_image():
  # Image 0: half pure red, half grey -> saturation 0.5; image 1: all white.
  x = np.zeros((2, 2, 2, 3), np.float32)
  x[0, 0] = [1, -1, -1]
  x[0, 1] = [0, 0, 0]
  x[1] = 1.0
  np.testing.assert_allclose(image_stats.saturation(x), [0.5, 0.0], atol=1e-5)
  np.testing.assert_allclose(image_stats.brightness(x), [(0.299 + 0.5) / 2, 1.0], atol=1e-5)
  r = base.build({"saturation": 2.0, "brightness": -1.0})
  assert r.differentiable and not r.host
  np.testing.assert_allclose(r(x, NO_PROMPTS), [1.0 - (0.299 + 0.5) / 2, -1.0], atol=1e-5)


@pytest.mark.parametrize("stat", ["saturation", "brightness"])
def test_image_stat_gradient_matches_finite_differences(stat):
  fn = getattr(image_stats, stat)
  rng = np.random.default_rng(0)
  # Interior values (no clipping), channels well apart so max/min are unique.
  base_rgb = np.array([0.6, 0.1, -0.4], np.float32)
  x = (base_rgb[rng.permutation(3)] + rng.uniform(-0.1, 0.1, (1, 3, 3, 3))).astype(np.float32)
  f = lambda z: fn(z).sum()
  g = np.asarray(jax.grad(f)(jnp.asarray(x)))
  assert np.abs(g).max() > 0
  h = 1e-2
  for _ in range(4):
    d = rng.normal(size=x.shape).astype(np.float32)
    d /= np.linalg.norm(d)
    fd = (float(f(x + h * d)) - float(f(x - h * d))) / (2 * h)
    np.testing.assert_allclose(float((g * d).sum()), fd, rtol=2e-2, atol=2e-4)
  # Elementwise on a few coordinates too.
  for idx in [(0, 0, 0, 0), (0, 1, 2, 1), (0, 2, 1, 2)]:
    e = np.zeros_like(x)
    e[idx] = h
    fd = (float(f(x + e)) - float(f(x - e))) / (2 * h)
    np.testing.assert_allclose(g[idx], fd, rtol=2e-2, atol=2e-4)


def test_image_stats_jit():
  x = _noise(5, (2, 4, 4, 3))
  for name in ("saturation", "brightness"):
    r = base.build({name: 1.0})
    np.testing.assert_allclose(jax.jit(r.fn)(x, NO_PROMPTS), r(x, NO_PROMPTS), atol=1e-6)


# --------------------------------------------------------------------------- combine / build


def test_combine_weighted_sum_and_parts():
  a = base.Reward("a", lambda x, p: x.sum((1, 2, 3)), differentiable=True)
  b = base.Reward("b", lambda x, p: (x ** 2).mean((1, 2, 3)), differentiable=True)
  x = jnp.asarray(_noise(6, (3, 2, 2, 3)))
  r = base.combine([(0.5, a), (-3.0, b)])
  want = 0.5 * a(x, NO_PROMPTS) - 3.0 * b(x, NO_PROMPTS)
  np.testing.assert_allclose(r(x, NO_PROMPTS), want, rtol=1e-5, atol=1e-6)
  assert r.differentiable and not r.host
  parts = r.parts(x, NO_PROMPTS)
  assert set(parts) == {"a", "b"}
  np.testing.assert_allclose(parts["a"], a(x, NO_PROMPTS))
  np.testing.assert_allclose(parts["b"], b(x, NO_PROMPTS))
  # Gradients flow through the combination.
  g = jax.grad(lambda z: r(z, NO_PROMPTS).sum())(x)
  np.testing.assert_allclose(g, 0.5 - 3.0 * 2 * x / 12, rtol=1e-5, atol=1e-6)
  # A single weight-1 term is the term itself; no terms is an error.
  assert base.combine([(1.0, a)]) is a
  with pytest.raises(ValueError):
    base.combine([])


def test_combine_host_and_jax_is_host_and_not_differentiable():
  x = np.concatenate([_flat(0.0, (1, 16, 16, 3)), _noise(7, (1, 16, 16, 3))])
  r = base.build({"jpeg_compressibility": 0.1, "brightness": 2.0})
  assert r.host and not r.differentiable
  kb = jpeg.jpeg_size_kb(x)
  lum = np.asarray(image_stats.brightness(x))
  out = r(x, NO_PROMPTS)
  assert isinstance(out, np.ndarray)
  np.testing.assert_allclose(out, -0.1 * kb + 2.0 * lum, rtol=1e-5, atol=1e-5)
  parts = r.parts(x, NO_PROMPTS)
  assert set(parts) == {"jpeg_compressibility", "brightness"}
  np.testing.assert_allclose(parts["jpeg_compressibility"], -kb)
  np.testing.assert_allclose(parts["brightness"], lum, atol=1e-6)


def test_build_unknown_name_raises():
  with pytest.raises(ValueError, match="nope"):
    base.build({"nope": 1.0})
  with pytest.raises(ValueError, match="jpeg_compressibility"):  # lists the known ones
    base.build({"nope": 1.0})


def test_reward_spec_parsing_and_bad_weights():
  assert base.parse_spec("saturation:0.5, brightness") == {"saturation": 0.5, "brightness": 1.0}
  assert base.parse_spec("saturation:0,brightness:2") == {"brightness": 2.0}
  with pytest.raises(ValueError, match=r"bad reward term 'saturation:x'"):
    base.parse_spec("saturation:x")
  for spec in ("saturation:nan", {"saturation": float("inf")}):
    with pytest.raises(ValueError, match=r"config.reward=.*saturation:(nan|inf).*not finite"):
      base.parse_spec(spec)


def test_non_finite_rewards_name_the_spec_and_the_term():
  base.check_finite_rewards(np.ones((4, 2)), "a:1,b:1", ["a", "b"])  # finite: silent
  v = np.ones((4, 2), np.float32)
  v[1, 1], v[3, 1] = np.nan, np.inf
  with pytest.raises(FloatingPointError,
                     match=r"config.reward='a:1,b:1' gave non-finite rewards \(term 'b': 2 of 4"):
    base.check_finite_rewards(v, "a:1,b:1", ["a", "b"])
  with pytest.raises(FloatingPointError, match=r"'saturation' gave non-finite rewards at epoch "
                                               r"2 \(1 of 3 samples\)"):
    base.check_finite_rewards(np.array([0.1, np.nan, 0.2]), "saturation", where="at epoch 2")


def test_registry_has_all_rewards():
  from rft.rewards import ensure_registered
  ensure_registered()
  for name in ("shapes_alignment", "shapes_alignment_log", "jpeg_compressibility",
               "jpeg_incompressibility", "saturation", "brightness"):
    assert name in base.REGISTRY


# --------------------------------------------------------------------------- ShapesWorld


def test_shapes_alignment_high_on_own_captions_low_on_others():
  world = shapes.ShapesWorld()
  images, ids, _ = world.sample(np.random.default_rng(0), 16, "train")
  tok = shapes.tokenizer()

  def prompts(pids):
    return {"ids": jnp.asarray(pids), "tokens": jnp.asarray(tok.encode([world.texts[i] for i in pids])),
            "assignments": jnp.asarray(world.assignments(pids))}

  r = base.build({"shapes_alignment": 1.0})
  assert r.differentiable and not r.host
  right = np.asarray(r(jnp.asarray(images), prompts(ids)))
  assert right.shape == (16,) and np.all((right >= 0) & (right <= 1 + 1e-6))
  assert right.mean() > 0.9, right
  wrong_ids = np.roll(ids, 1)
  differs = np.array([world.texts[a] != world.texts[b] for a, b in zip(ids, wrong_ids)])
  assert differs.sum() >= 8
  wrong = np.asarray(r(jnp.asarray(images), prompts(wrong_ids)))
  assert wrong[differs].mean() < 0.3, wrong
  # Differentiable: finite gradients w.r.t. the images.
  g = jax.grad(lambda x: r(x, prompts(ids)).sum())(jnp.asarray(images))
  assert g.shape == images.shape and bool(jnp.all(jnp.isfinite(g)))


def test_reward_params_enter_jit_as_arguments():
  """A learned reward's weights ride in Reward.params: combined, called inside jit with the
  params as an argument, they are not baked into the executable as constants."""
  import jax
  w = jax.random.normal(jax.random.key(0), (256, 256))
  learned = base.Reward(
      "learned", lambda im, pr, p: jnp.mean(im, (1, 2, 3)) * jnp.sum(p["w"]), True,
      params={"w": w})
  plain = base.Reward("plain", lambda im, pr: jnp.mean(im, (1, 2, 3)), True)
  both = base.combine([(2.0, learned), (1.0, plain)])
  images = jnp.ones((2, 4, 4, 3)) * 0.5
  f = jax.jit(lambda im, p: both(im, {}, p))
  expected = 2.0 * 0.5 * float(jnp.sum(w)) + 0.5
  np.testing.assert_allclose(np.asarray(f(images, both.params)), expected, rtol=1e-5)
  assert len(f.lower(images, both.params).as_text()) < 20_000  # w alone prints as ~500 KB
  parts = both.parts(images, {})
  np.testing.assert_allclose(np.asarray(parts["learned"]), 0.5 * float(jnp.sum(w)), rtol=1e-5)
