"""ShapesWorld: grammar, split, scene sampling, rendering, alignment math, tokenizer."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from rft.data import shapes
from rft.rewards import shapes_alignment as align


@pytest.fixture(scope="module")
def world():
  return shapes.ShapesWorld()


def test_prompt_count_and_uniqueness(world):
  assert len(world.prompts) == 3168
  assert len(set(world.texts)) == 3168
  fam = [p.family for p in world.prompts]
  assert fam.count("single") == 360 and fam.count("count") == 48
  assert fam.count("and") == 552 and fam.count("relation") == 2208


def test_split_holds_out_combinations_not_attributes(world):
  train, held = world.split_ids["train"], world.split_ids["heldout"]
  assert len(np.intersect1d(train, held)) == 0
  assert len(train) + len(held) == len(world.prompts)
  assert 0.15 < len(held) / len(world.prompts) < 0.3
  train_combos = {world.prompts[i].combination for i in train}
  for i in held:
    assert world.prompts[i].combination not in train_combos
  train_words = {w for i in train for w in world.texts[i].split()}
  held_words = {w for i in held for w in world.texts[i].split()}
  assert held_words <= train_words  # every word (attribute) is seen in training
  # Deterministic from the seed; another seed gives another split.
  assert np.array_equal(shapes.ShapesWorld().split_ids["heldout"], held)
  assert not np.array_equal(shapes.ShapesWorld(split_seed=1).split_ids["heldout"], held)


def test_sampling_is_deterministic(world):
  a = world.sample(np.random.default_rng(3), 16)
  b = world.sample(np.random.default_rng(3), 16)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  c = world.sample(np.random.default_rng(4), 16)
  assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_sampled_scenes_satisfy_their_caption(world, split):
  rng = np.random.default_rng(0)
  ids = world.sample_prompt_ids(rng, 2000, split)
  assert set(ids) <= set(world.split_ids[split])
  cells = world.sample_scenes(rng, ids)
  ok = align.is_aligned(jnp.asarray(cells), jnp.asarray(world.assignments(ids)))
  assert bool(ok.all())
  n_named = np.array([world.prompts[i].count if world.prompts[i].family == "count"
                      else len(world.prompts[i].objects) for i in ids])
  np.testing.assert_array_equal((cells > 0).sum(1), n_named)  # exactly the named objects


def test_relation_semantics(world):
  i = world.prompt_ids(["a red circle above a blue square"])[0]
  a = world.assignments([i])[0]
  red_circle = [shapes.class_index(0, 0, s) for s in (0, 1)]
  blue_square = [shapes.class_index(2, 1, s) for s in (0, 1)]
  scene = lambda cells: jnp.asarray([cells])
  tl, tr, bl, br = 0, 1, 2, 3
  good = [0, 0, 0, 0]; good[tr] = red_circle[0]; good[bl] = blue_square[1]
  bad = [0, 0, 0, 0]; bad[bl] = red_circle[0]; bad[tr] = blue_square[1]
  same_row = [0, 0, 0, 0]; same_row[tl] = red_circle[0]; same_row[tr] = blue_square[0]
  extra = list(good); extra[br] = shapes.class_index(3, 2, 0)
  assert bool(align.is_aligned(scene(good), a[None])[0])
  assert not bool(align.is_aligned(scene(bad), a[None])[0])
  assert not bool(align.is_aligned(scene(same_row), a[None])[0])
  assert not bool(align.is_aligned(scene(extra), a[None])[0])  # an unnamed object
  assert int(a[:, 0].any(-1).sum()) == 4  # (top row) x (bottom row) placements


def test_alignment_probability_hand_computed(world):
  """Uniform cell distributions: P = sum over placements of prod of allowed mass."""
  k = shapes.NUM_CLASSES
  logp = jnp.full((1, 4, k), -np.log(k))
  cases = {
      "a red circle at the top left": (2 / k) * (1 / k) ** 3,
      "a small red circle at the top left": (1 / k) * (1 / k) ** 3,
      "a red circle": 4 * (2 / k) * (1 / k) ** 3,
      "two red circles": 6 * (2 / k) ** 2 * (1 / k) ** 2,
      "a red circle and a blue square": 12 * (2 / k) ** 2 * (1 / k) ** 2,
      "a red circle to the left of a blue square": 4 * (2 / k) ** 2 * (1 / k) ** 2,
  }
  for text, expected in cases.items():
    a = jnp.asarray(world.assignments(world.prompt_ids([text])))
    got = float(jnp.exp(align.alignment_log_prob(logp, a))[0])
    assert got == pytest.approx(expected, rel=1e-4), text


def test_alignment_probability_of_confident_truth_and_gradient(world):
  rng = np.random.default_rng(1)
  ids = world.sample_prompt_ids(rng, 64)
  cells = world.sample_scenes(rng, ids)
  a = jnp.asarray(world.assignments(ids))
  logits = jnp.where(jnp.eye(shapes.NUM_CLASSES, dtype=bool)[cells], 20.0, 0.0)
  logp = logits - jax_logsumexp(logits)
  p = jnp.exp(align.alignment_log_prob(logp, a))
  assert float(p.min()) > 0.99
  import jax
  g = jax.grad(lambda l: align.alignment_log_prob(l - jax_logsumexp(l), a).sum())(logits * 0)
  assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0


def jax_logsumexp(x):
  import jax
  return jax.nn.logsumexp(x, axis=-1, keepdims=True)


def test_joint_cell_log_probs_factorisation():
  rng = np.random.default_rng(0)
  logits = {"occupied": rng.normal(size=(2, 4, 2)), "color": rng.normal(size=(2, 4, 6)),
            "shape": rng.normal(size=(2, 4, 4)), "size": rng.normal(size=(2, 4, 2))}
  lp = np.asarray(align.joint_cell_log_probs({k: jnp.asarray(v) for k, v in logits.items()}))
  sm = {k: np.exp(v) / np.exp(v).sum(-1, keepdims=True) for k, v in logits.items()}
  np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.exp(lp[..., 0]), sm["occupied"][..., 0], rtol=1e-5)
  for col, sh, sz in itertools.product(range(6), range(4), range(2)):
    want = sm["occupied"][..., 1] * sm["color"][..., col] * sm["shape"][..., sh] * sm["size"][..., sz]
    np.testing.assert_allclose(np.exp(lp[..., shapes.class_index(col, sh, sz)]), want, rtol=1e-4)
  assert shapes.class_attributes(shapes.class_index(4, 3, 1)) == (4, 3, 1)


def test_render_pixels():
  empty = shapes.render_np(np.zeros((1, 4), np.int32))
  np.testing.assert_array_equal(empty, -1.0)
  k = shapes.class_index(0, 1, 1)  # large red square, centred in the top-left cell
  img = shapes.render_np(np.array([[k, 0, 0, 0]]))[0]
  np.testing.assert_allclose(img[4, 4], shapes.COLOR_RGB[0] * 2 - 1, atol=1e-6)
  np.testing.assert_array_equal(img[:, 8:], -1.0)  # nothing outside its cell
  np.testing.assert_array_equal(img[8:], -1.0)
  assert img.shape == (16, 16, 3) and img.min() >= -1 and img.max() <= 1
  # Shapes differ: a large circle leaves its bounding-box corners dark, a square does not.
  circle = shapes.render_np(np.array([[shapes.class_index(0, 0, 1), 0, 0, 0]]))[0]
  assert circle[1, 1, 0] < img[1, 1, 0]
  small = shapes.render_np(np.array([[shapes.class_index(0, 1, 0), 0, 0, 0]]))[0]
  assert (small[..., 0] > 0).sum() < (img[..., 0] > 0).sum()


def test_jitter_keeps_objects_in_their_cell(world):
  rng = np.random.default_rng(0)
  cells = np.full((256, 4), 0, np.int32)
  cells[:, 3] = rng.integers(1, shapes.NUM_CLASSES, 256)
  imgs = shapes.render_np(cells, rng)
  np.testing.assert_array_equal(imgs[:, :8], -1.0)
  np.testing.assert_array_equal(imgs[:, :, :8], -1.0)


def test_tokenizer():
  tok = shapes.tokenizer()
  texts = ["a red circle to the left of a blue square", "two green crosses", ""]
  ids = tok.encode(texts)
  assert ids.shape == (3, 12) and ids.dtype == np.int32
  assert tok.decode(ids) == texts
  assert (ids[2] == 0).all()
  with pytest.raises(KeyError, match="'purple'"):
    tok.encode(["a purple circle"])
  with pytest.raises(ValueError, match="max_len"):
    tok.encode(["a " * 13])


def test_unknown_caption_is_a_clear_error(world):
  with pytest.raises(KeyError, match="not a ShapesWorld caption: 'a red blob'"):
    world.prompt_ids(["a red blob"])


def test_eval_prompts_fixed_and_within_split(world):
  a = world.eval_prompt_ids("heldout", 256)
  assert len(a) == len(set(a)) == 256
  assert set(a) <= set(world.split_ids["heldout"])
  np.testing.assert_array_equal(a, world.eval_prompt_ids("heldout", 256))
  with pytest.raises(ValueError, match="split"):
    world.eval_prompt_ids("test", 4)
