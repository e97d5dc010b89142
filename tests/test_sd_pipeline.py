"""Stable Diffusion in rft against diffusers: DDIM steps, the folder loader, a full CFG
DDIM step through text encoder + UNet, decoding, and the online loop on a tiny SD folder."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from rft.diffusion import ddim, sampling  # noqa: E402
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


# ----------------------------------------------------------------------------- tiny SD


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny_sd(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param))
  tiny_sd_folder(path, variant=request.param)
  return request.param, path


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def test_full_cfg_ddim_step_and_decode_match_diffusers(tiny_sd):
  """Prompt -> tokens -> text states -> CFG UNet -> DDIM step (eta 1) -> VAE decode, against
  the same computation with diffusers' components and DDIMScheduler (SD1: eps, SD2:
  v-prediction and linear projections)."""
  from diffusers import StableDiffusionPipeline
  from rft.diffusion.pipeline import sd_pipeline
  variant, path = tiny_sd
  sd = sd_lib.load_sd(path)
  pipe = sd_pipeline(sd)
  assert sd.latent_shape == (8, 8, 4) and sd.resolution == 16
  ref = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
  prompts = ["a red cat", "two dogs on grass"]
  tokens = sd.tokenize(prompts)
  ref_ids = ref.tokenizer(prompts, padding="max_length", max_length=ref.tokenizer.model_max_length,
                          truncation=True, return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(tokens, ref_ids)
  cond, null = pipe.conditions(sd.params, jnp.asarray(tokens))
  with torch.no_grad():
    ref_cond = ref.text_encoder(torch.from_numpy(ref_ids.astype(np.int64)))[0].numpy()
    ref_null = ref.text_encoder(torch.from_numpy(np.asarray(sd.tokenize([""]), np.int64)))[0].numpy()
  assert np.abs(np.asarray(cond) - ref_cond).max() <= 1e-4
  assert np.abs(np.asarray(null) - ref_null).max() <= 1e-4

  sched = _diffusers_ddim(10, sd.scheduler.prediction_type)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  worst = 0.0
  for i, (t, prev_t) in enumerate(zip(*ddim.ddim_timesteps(1000, 10, 1))):
    if i not in (0, 5, 9):
      continue
    key = jax.random.key(i)
    ours, _ = sampling.model_step(pipe.model_fn, sd.params,
                                  ddim.DDIMSampler(pipe.schedule, 1.0, prediction=pipe.prediction),
                                  jnp.asarray(x), int(t), int(prev_t), cond, null, 5.0, key=key)
    noise = np.asarray(jax.random.normal(key, x.shape, jnp.float32))
    with torch.no_grad():
      out = ref.unet(torch.cat([_nchw(x)] * 2), int(t),
                     encoder_hidden_states=torch.from_numpy(
                         np.concatenate([np.repeat(ref_null, 2, 0), ref_cond]))).sample
      u, c = out.chunk(2)
      guided = u + 5.0 * (c - u)
      prev = sched.step(guided, int(t), _nchw(x), eta=1.0, variance_noise=_nchw(noise)).prev_sample
    worst = max(worst, float(np.abs(np.asarray(ours) - prev.numpy().transpose(0, 2, 3, 1)).max()))
  assert worst <= 1e-4, worst

  images = pipe.images(sd.params, jnp.asarray(x))
  with torch.no_grad():
    ref_img = ref.vae.decode(_nchw(x) / ref.vae.config.scaling_factor).sample.clamp(-1, 1)
  assert images.shape == (2, 16, 16, 3)
  assert np.abs(np.asarray(images) - ref_img.numpy().transpose(0, 2, 3, 1)).max() <= 1e-4


def test_load_sd_errors(tmp_path, tiny_sd):
  _, path = tiny_sd
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    sd_lib.load_sd(str(tmp_path / "nope"))
  bad = tmp_path / "bad"
  shutil.copytree(path, bad)
  with open(bad / "model_index.json") as f:
    index = json.load(f)
  index["unet"] = ["diffusers", "UNet2DModel"]
  with open(bad / "model_index.json", "w") as f:
    json.dump(index, f)
  with pytest.raises(ValueError, match="unet is a UNet2DModel"):
    sd_lib.load_sd(str(bad))
  index["unet"] = ["diffusers", "UNet2DConditionModel"]
  with open(bad / "model_index.json", "w") as f:
    json.dump(index, f)
  shutil.rmtree(bad / "tokenizer")
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    sd_lib.load_sd(str(bad))


def test_paper_configs_name_missing_model(tmp_path, monkeypatch):
  """A paper config without the model files fails at once, naming what is missing."""
  from rft import config as config_lib
  from rft.worlds import diffusion_worlds
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
  monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
  for name, arg in [("prdp", "sd14_hpsv2"), ("prdp", "sd14_pickscore"), ("prdp", "hpdv2_hpsv2"),
                    ("prdp", "multi_reward"), ("ddpo", "sd14_aesthetic"),
                    ("ddpo", "sd14_compressibility"), ("draft", "sd14_hpsv2")]:
    c = config_lib.load(name, arg)
    assert c.world == "sd" and c.sampler.num_steps == 50
    with pytest.raises(FileNotFoundError, match="CompVis/stable-diffusion-v1-4.*model_index.json"):
      diffusion_worlds.build(c, str(tmp_path))
  c = config_lib.load("prdp", "sd14_hpsv2")
  assert (c.epochs, c.updates_per_epoch, c.prompts_per_epoch, c.samples_per_prompt) == (100, 10, 32, 16)
  assert (c.objective.beta, c.objective.clip_eps, c.lr) == (3e-5, 1e-6, 1e-5)
  c = config_lib.load("prdp", "hpdv2_hpsv2")
  assert (c.epochs, c.updates_per_epoch, c.prompts_per_epoch, c.samples_per_prompt) == (1000, 1, 64, 8)
  assert (c.objective.beta, c.objective.clip_eps, c.lr) == (3e-6, 1e-4, 7e-6)
  assert c.prompt_set == "hpdv2"
  c = config_lib.load("prdp", "multi_reward")
  assert c.reward == "pickscore:10,hpsv2:2,aesthetic:0.05"


# CI runs one objective of each kind that samples differently on SD (trajectories: PRDP;
# reward backprop through the VAE: DRaFT); DDPO and RAFT run on ShapesWorld in CI
# (test_online.py) and on SD in the slow set.
@pytest.mark.parametrize("config", [
    "configs/prdp.py:smoke", "configs/draft.py:smoke",
    pytest.param("configs/ddpo.py:smoke", marks=pytest.mark.slow),
    pytest.param("configs/raft.py:smoke", marks=pytest.mark.slow)])
def test_online_loop_on_tiny_sd(tmp_path, config):
  """PRDP, DRaFT, DDPO and RAFT run unchanged on a diffusers SD folder (LoRA on the UNet
  attention, an image reward on VAE-decoded samples, differentiated through the decoder
  for DRaFT); the finetuned UNet is exported in diffusers format, loads with diffusers and
  differs from the base exactly where LoRA applies."""
  from diffusers import UNet2DConditionModel
  path = tiny_sd_folder(str(tmp_path / "sd"), variant="sd1")
  work = tmp_path / "work"
  run_main(config, work, "--config.world=sd", f"--config.model_path={path}",
           "--config.reward=brightness", "--config.sampler.clip_x0=1.0",
           "--config.finetune.mode=lora",
           r"--config.finetune.lora_targets=^unet/.*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$",
           "--config.lr=1e-2", "--config.sampler.guidance_scale=2.0", timeout=900)
  results = json.load(open(work / "results.json"))
  assert "train/reward_brightness" in results["history"]["2"]
  tuned = UNet2DConditionModel.from_pretrained(str(work / "unet"))
  # the adapter alone, in diffusers' PEFT format (tests/test_sd_lora_export.py loads one)
  assert (work / "lora" / "pytorch_lora_weights.safetensors").is_file()
  base = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
  diffs = {k: float((v - base.state_dict()[k]).abs().max()) for k, v in tuned.state_dict().items()}
  changed = [k for k, d in diffs.items() if d > 0]
  assert changed and all(".attn" in k and k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0")
                         for k in changed), changed[:5]
