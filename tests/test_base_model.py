"""The shipped ShapesWorld base model: loads, samples, ratio 1, usable but imperfect."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft import pretrained
from rft.data import shapes
from rft.diffusion import sampling
from rft.diffusion.pipeline import SamplerConfig, shapes_pipeline
from rft.diffusion.schedules import make_schedule
from rft.worlds import shapes_eval


@pytest.fixture(scope="module")
def base():
  model, params, meta = pretrained.load_shapes_base()
  pipe = shapes_pipeline(model, make_schedule(**meta["schedule"]))
  return model, params, meta, pipe, SamplerConfig(**meta["sampler"])


def test_sampler_log_probs_recompute_exactly_on_the_base_model(base):
  _, params, _, pipe, cfg = base
  tok = shapes.tokenizer()
  tokens = jnp.asarray(tok.encode(["a red circle above a blue square", "two green crosses"] * 2))
  traj, cond, null = jax.jit(lambda p, t, k: pipe.sample(p, t, k, cfg))(params, tokens,
                                                                       jax.random.key(0))
  assert traj.latents.shape == (4, cfg.num_steps + 1, 16, 16, 3)
  assert bool(jnp.isfinite(traj.log_probs).all())
  recompute = jax.jit(lambda p, tr, c, n: sampling.trajectory_log_probs(
      pipe.eps_fn, p, cfg.build(pipe.schedule), tr, c, n, guidance_scale=cfg.guidance_scale))
  new = recompute(params, traj, cond, null)
  np.testing.assert_array_equal(np.exp(new - traj.log_probs), 1.0)
  perturbed = jax.tree.map(lambda x: x * 1.01, params)
  assert float(jnp.abs(recompute(perturbed, traj, cond, null) - traj.log_probs).max()) > 0


def test_base_model_is_usable_but_imperfect(base):
  """Evaluator alignment on fixed prompts: far above an untrained model, below perfect."""
  _, params, meta, pipe, cfg = base
  world, tok = shapes.ShapesWorld(meta["holdout_fraction"], meta["split_seed"]), shapes.tokenizer()
  tokens = tok.encode(world.texts)
  sample = jax.jit(lambda p, t, k: pipe.sample(p, t, k, cfg)[0].sample)
  fn = lambda ids, key: sample(params, jnp.asarray(tokens[ids]), key)
  judge = shapes_eval.make_judge(shapes_eval.Scorer.load("shapes_evaluator"))
  assert cfg.guidance_scale == 1.5 and cfg.num_steps == 20 and cfg.eta == 1.0
  out = {}
  for split in ("train", "heldout"):
    ids = world.eval_prompt_ids(split, 128)
    out[split], _ = shapes_eval.evaluate_alignment(fn, judge, world, ids, jax.random.key(3),
                                                  batch_size=128)
  print(out)
  # Measured on 256 prompts per split (meta["results"]): train 0.50, held-out 0.37.
  assert 0.3 <= out["train"]["alignment"] <= 0.9, out
  assert 0.15 <= out["heldout"]["alignment"] <= 0.9, out
  assert out["train"]["objects_present"] >= 0.7, out  # the named objects are drawn
