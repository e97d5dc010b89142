"""The shipped ShapesWorld scorers: accuracy on rendered held-out images, independence."""
import jax.numpy as jnp
import numpy as np
import pytest

from rft import pretrained
from rft.data import shapes
from rft.train import scorers as scorer_training
from rft.worlds import shapes_eval
from tests.helpers import run_main


@pytest.fixture(scope="module")
def world():
  return shapes.ShapesWorld()


@pytest.mark.parametrize("name", ["shapes_reward", "shapes_evaluator"])
def test_shipped_scorer_is_95_percent_accurate_on_heldout_renders(world, name):
  s = shapes_eval.Scorer.load(name)
  apply_fn = lambda p, x: s.module.apply({"params": p}, x)
  r = scorer_training.evaluate_scorer(apply_fn, s.params, world, 1024, seed=777)
  assert r["scene_acc"] >= 0.95, r
  assert r["alignment"] >= 0.95, r
  noisy = scorer_training.evaluate_scorer(apply_fn, s.params, world, 512, seed=778, noise=0.1)
  assert noisy["scene_acc"] >= 0.9, noisy


def test_scorers_are_independent():
  r = pretrained.load_meta("shapes_reward")
  e = pretrained.load_meta("shapes_evaluator")
  assert r["arch"] != e["arch"] and r["seed"] != e["seed"]


def test_judge_rejects_wrong_captions_and_reward_ranks_right_above_wrong(world):
  judge = shapes_eval.make_judge(shapes_eval.Scorer.load("shapes_evaluator"),
                                 shapes_eval.Scorer.load("shapes_reward"))
  rng = np.random.default_rng(5)
  ids = world.sample_prompt_ids(rng, 256, "heldout")
  images = shapes.render_np(world.sample_scenes(rng, ids), rng)
  wrong = np.roll(ids, 1)  # another prompt's caption
  differs = np.array([world.texts[a] != world.texts[b] for a, b in zip(ids, wrong)])
  right = judge(jnp.asarray(images), jnp.asarray(world.assignments(ids)))
  bad = judge(jnp.asarray(images), jnp.asarray(world.assignments(wrong)))
  assert float(np.mean(right["aligned"])) > 0.95
  assert float(np.mean(np.asarray(bad["aligned"])[differs])) < 0.1
  assert float(np.mean(right["reward"])) > 0.9
  assert float(np.mean(np.asarray(bad["reward"])[differs])) < 0.15


def test_scorer_training_smoke_exports_bundles(tmp_path):
  run_main("configs/scorers_shapes.py:smoke", tmp_path)
  for name in ("shapes_reward", "shapes_evaluator"):
    meta = pretrained.load_meta(name, str(tmp_path))
    assert meta["steps"] == 20 and 0.0 <= meta["results"]["heldout_cell_acc"] <= 1.0
    shapes_eval.Scorer.load(name, str(tmp_path))


def test_augment_keeps_shape_and_changes_pixels():
  import jax
  x = jnp.asarray(shapes.render_np(np.array([[1, 0, 0, 9]])))
  y = scorer_training.augment(jax.random.key(0), jnp.repeat(x, 4, 0))
  assert y.shape == (4, 16, 16, 3) and not np.allclose(np.asarray(y), np.asarray(x))
  assert np.isfinite(np.asarray(y)).all()


def test_objects_present_ignores_position_and_extras_but_not_counts(world):
  p = world.prompts[world.prompt_ids(["two red circles"])[0]]
  rc, bs = shapes.class_index(0, 0, 0), shapes.class_index(2, 1, 1)
  assert shapes_eval.objects_present(p, np.array([rc, 0, rc, bs]))
  assert not shapes_eval.objects_present(p, np.array([rc, 0, 0, bs]))
  q = world.prompts[world.prompt_ids(["a red circle above a blue square"])[0]]
  assert shapes_eval.objects_present(q, np.array([bs, 0, rc, 0]))  # wrong relation, both there
  assert not shapes_eval.objects_present(q, np.array([rc, 0, 0, 0]))
