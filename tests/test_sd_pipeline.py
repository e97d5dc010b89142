"""Stable Diffusion in rft against diffusers: DDIM steps, the folder loader, a full CFG
DDIM step through text encoder + UNet, decoding, and the online loop on a tiny SD folder."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from rft.diffusion import ddim  # noqa: E402
from rft.diffusion.schedules import make_schedule  # noqa: E402
from rft.weights import sd as sd_lib  # noqa: E402
from tests.helpers import run_main  # noqa: E402
from tests.sd_fixtures import tiny_sd_folder  # noqa: E402


def _diffusers_ddim(num_steps, prediction_type="epsilon"):
  s = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
  s.set_timesteps(num_steps)
  return s


@pytest.mark.parametrize("num_steps", [10, 50])
def test_ddim_step_matches_diffusers_scheduler(num_steps):
  """Every transition of a 10- / 50-step eta=1 chain, same eps and noise, as diffusers."""
  ref = _diffusers_ddim(num_steps)
  schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  t_ours, prev_ours = ddim.ddim_timesteps(1000, num_steps, 1)
  np.testing.assert_array_equal(t_ours, ref.timesteps.numpy())
  rng = np.random.default_rng(0)
  worst = 0.0
  for i, (t, prev_t) in enumerate(zip(t_ours, prev_ours)):
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    eps = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    key = jax.random.key(i)
    ours, lp, _ = ddim.ddim_step(schedule, jnp.asarray(eps), int(t), int(prev_t), jnp.asarray(x),
                                 1.0, key=key)
    noise = np.asarray(jax.random.normal(key, x.shape, jnp.float32))
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    out = ref.step(nchw(eps), int(t), nchw(x), eta=1.0, variance_noise=nchw(noise)).prev_sample
    err = np.abs(np.asarray(ours) - out.numpy().transpose(0, 2, 3, 1)).max()
    worst = max(worst, float(err))
    assert np.all(np.isfinite(np.asarray(lp)))
  assert worst <= 1e-5, worst


def test_scheduler_config_parsing_and_errors():
  spec = sd_lib.scheduler_from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                       "beta_end": 0.012, "num_train_timesteps": 1000,
                                       "steps_offset": 1, "prediction_type": "v_prediction",
                                       "_class_name": "PNDMScheduler", "skip_prk_steps": True})
  assert spec.prediction_type == "v_prediction" and spec.steps_offset == 1
  ref = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  np.testing.assert_array_equal(np.asarray(spec.schedule.alphas_cumprod),
                                np.asarray(ref.alphas_cumprod))
  with pytest.raises(ValueError, match="timestep_spacing='trailing'"):
    sd_lib.scheduler_from_config({"timestep_spacing": "trailing"}, source="x.json")
  with pytest.raises(ValueError, match="prediction_type='sample'"):
    sd_lib.scheduler_from_config({"prediction_type": "sample"})
  with pytest.raises(ValueError, match="beta_schedule='sigmoid'"):
    sd_lib.scheduler_from_config({"beta_schedule": "sigmoid"})
