"""Stable Diffusion 3 in rft against diffusers: the folder loader, the whole CFG Euler-ODE
sampling + VAE decode against StableDiffusion3Pipeline (static and dynamic shifting),
loader errors, save_mmdit, the CLIP loader's file choice, and the online loop on a tiny
SD3 folder (world "sd3")."""
import dataclasses
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from rft.diffusion import sampling  # noqa: E402
from rft.diffusion.flow import FlowSampler, FlowSchedule  # noqa: E402
from rft.diffusion.pipeline import sd3_pipeline  # noqa: E402
from rft.diffusion.sampling import SamplerConfig  # noqa: E402
from rft.weights import sd3 as sd3_lib  # noqa: E402
from tests.helpers import run_main  # noqa: E402
from tests.sd_fixtures import tiny_sd3_folder  # noqa: E402

PROMPTS = ["a red cat", "two dogs on the grass"]
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
  return tiny_sd3_folder(str(tmp_path_factory.mktemp("sd3") / "sd3"))


def _copy(src, dst, edit_json=None):
  """A copy of the folder `src` with `edit_json[relpath](dict)` applied to its JSON files."""
  shutil.copytree(src, dst)
  for rel, fn in (edit_json or {}).items():
    p = os.path.join(dst, rel)
    with open(p) as f:
      d = json.load(f)
    fn(d)
    with open(p, "w") as f:
      json.dump(d, f)
  return str(dst)


def _set(**kw):
  return lambda d: d.update(kw)


@pytest.fixture(scope="module")
def tiny_sd3_dynamic(tiny_sd3, tmp_path_factory):
  return _copy(tiny_sd3, tmp_path_factory.mktemp("sd3dyn") / "sd3",
               {"scheduler/scheduler_config.json": _set(use_dynamic_shifting=True)})


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_sampling_and_decode_match_diffusers(which, tiny_sd3, tiny_sd3_dynamic):
  """Prompts -> three encoders -> CFG MMDiT -> 4 Euler-ODE steps (rft's "flow" sampler at
  eta 0) -> VAE decode equals StableDiffusion3Pipeline with the same initial latents,
  guidance 4 and its FlowMatchEulerDiscreteScheduler (shift 3; or dynamic shifting with
  mu from the image sequence length)."""
  from diffusers import StableDiffusion3Pipeline
  path = tiny_sd3 if which == "static" else tiny_sd3_dynamic
  sd3 = sd3_lib.load_sd3(path)
  pipe = sd3_pipeline(sd3)
  assert sd3.resolution == 16 and sd3.latent_shape == (8, 8, 16) and sd3.image_seq_len == 16
  assert pipe.prediction == "velocity"
  steps, scale = 4, 4.0
  cfg = SamplerConfig(num_steps=steps, eta=0.0, guidance_scale=scale, clip_x0=None, name="flow")
  sampler = pipe.sampler(cfg)
  assert isinstance(sampler, FlowSampler) and sampler.deterministic
  if which == "dynamic":
    assert sd3.schedule.use_dynamic_shifting
    m = (1.15 - 0.5) / (4096 - 256)
    assert sampler.mu == pytest.approx(16 * m + 0.5 - m * 256) and sampler.mu == sd3.mu
  else:
    assert sd3.schedule.shift == 3.0 and sampler.mu is None and pipe.sampler_fields is None

  x = np.random.default_rng(0).standard_normal((2, *sd3.latent_shape)).astype(np.float32)
  tokens = jnp.asarray(sd3.tokenize(PROMPTS))
  cond, null = jax.jit(pipe.conditions)(sd3.params, tokens)
  assert set(cond) == {"states", "pooled"} and cond["states"].shape[0] == 2
  run = jax.jit(lambda p, x0, c, n: sampling.rollout(pipe.model_fn, p, sampler, x0, c, n,
                                                      num_steps=steps, guidance_scale=scale))
  traj = run(sd3.params, jnp.asarray(x), cond, null)
  images = np.asarray(jax.jit(pipe.images)(sd3.params, traj.sample))
  assert images.shape == (2, 16, 16, 3)

  ref = StableDiffusion3Pipeline.from_pretrained(path)
  kw = dict(prompt=PROMPTS, guidance_scale=scale, num_inference_steps=steps, height=16,
            width=16)
  with torch.no_grad():
    ref_lat = ref(latents=_nchw(x), output_type="latent", **kw).images.numpy()
    ref_img = ref(latents=_nchw(x), output_type="np", **kw).images
  np.testing.assert_array_equal(np.asarray(traj.timesteps), ref.scheduler.timesteps.numpy())
  lat_err = float(np.abs(np.asarray(traj.sample) - ref_lat.transpose(0, 2, 3, 1)).max())
  img_err = float(np.abs((images + 1) / 2 - ref_img).max())
  print(f"SD3 parity ({which}): final latents max abs diff {lat_err:.3g} (|latents| <= "
        f"{np.abs(ref_lat).max():.3g}), images {img_err:.3g}")
  assert lat_err <= TOL, lat_err
  assert img_err <= TOL, img_err
  # The stochastic Flow-GRPO sampler on the same pipeline: finite log-probs, different
  # samples per key.
  sde = pipe.sampler(dataclasses.replace(cfg, eta=0.7))
  assert sde.mu == sampler.mu
  traj2 = sampling.rollout(pipe.model_fn, sd3.params, sde, jnp.asarray(x), cond, null,
                           num_steps=steps, guidance_scale=scale, key=jax.random.key(0))
  assert np.all(np.isfinite(np.asarray(traj2.log_probs)))


def test_tokens_concatenate_and_split(tiny_sd3):
  sd3 = sd3_lib.load_sd3(tiny_sd3, load_t5=False, max_sequence_length=8)
  a, b, c = sd3.token_lengths
  tokens = sd3.tokenize(PROMPTS)
  assert tokens.dtype == np.int32 and tokens.shape == (2, a + b + c) and c == 8
  ref = sd3.text.tokenize(PROMPTS, 8)
  parts = sd3.split_tokens(tokens)
  for k in ("clip_l", "clip_g", "t5"):
    np.testing.assert_array_equal(parts[k], ref[k])
  assert "text_encoder_3" not in sd3.params and sd3.text.encoders.t5 is None
  cond, null = sd3_pipeline(sd3).conditions(sd3.params, jnp.asarray(tokens))
  assert cond["states"].shape == (2, a + c, 48) and null["pooled"].shape == (1, 32)
  with pytest.raises(ValueError, match="ids per prompt"):
    sd3.split_tokens(tokens[:, :-1])


def test_scheduler_config_parsing_and_errors():
  s = sd3_lib.flow_schedule_from_config(
      {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "invert_sigmas": False,
       "shift_terminal": None, "use_karras_sigmas": False, "time_shift_type": "exponential",
       "num_train_timesteps": 1000})
  assert s == FlowSchedule(shift=3.0)
  s = sd3_lib.flow_schedule_from_config({"use_dynamic_shifting": True, "base_shift": 0.4,
                                         "max_shift": 1.2, "base_image_seq_len": 128,
                                         "max_image_seq_len": 2048})
  assert s == FlowSchedule(use_dynamic_shifting=True, base_shift=0.4, max_shift=1.2,
                           base_image_seq_len=128, max_image_seq_len=2048)
  for key, value in [("invert_sigmas", True), ("use_karras_sigmas", True),
                     ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
                     ("stochastic_sampling", True), ("shift_terminal", 0.02),
                     ("time_shift_type", "linear"), ("some_new_option", 1)]:
    with pytest.raises(ValueError, match=f"x.json: .*{key}={value!r}"):
      sd3_lib.flow_schedule_from_config({key: value}, source="x.json")
  with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
    sd3_lib.flow_schedule_from_config({"_class_name": "EulerDiscreteScheduler"})


def test_load_sd3_errors(tiny_sd3, tmp_path):
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    sd3_lib.load_sd3(str(tmp_path / "nope"))
  index = "model_index.json"
  cases = [
      ({index: _set(_class_name="StableDiffusionPipeline")}, None, ValueError,
       "_class_name='StableDiffusionPipeline'"),
      ({index: lambda d: d.pop("transformer")}, None, ValueError,
       "no 'transformer' component"),
      ({index: _set(vae=["diffusers", "AutoencoderTiny"])}, None, ValueError,
       "vae is a AutoencoderTiny"),
      ({index: lambda d: d.pop("text_encoder_2")}, None, ValueError,
       "no 'text_encoder_2' component"),
      ({"scheduler/scheduler_config.json": _set(invert_sigmas=True)}, None, ValueError,
       "invert_sigmas=True"),
      ({"scheduler/scheduler_config.json": _set(use_karras_sigmas=True)}, None, ValueError,
       "use_karras_sigmas=True"),
      ({}, "transformer", FileNotFoundError, "missing component 'transformer'"),
      ({}, "tokenizer_2", FileNotFoundError, "missing component 'tokenizer_2'"),
  ]
  for i, (edits, remove, exc, match) in enumerate(cases):
    bad = _copy(tiny_sd3, tmp_path / f"bad{i}", edits)
    if remove:
      shutil.rmtree(os.path.join(bad, remove))
    with pytest.raises(exc, match=match):
      sd3_lib.load_sd3(bad)
  with pytest.raises(ValueError, match="pos_embed_max_size"):
    sd3_lib.load_sd3(tiny_sd3, resolution=64)
  with pytest.raises(ValueError, match="not divisible"):
    sd3_lib.load_sd3(tiny_sd3, resolution=18)


def test_save_mmdit_loads_in_diffusers(tiny_sd3, tmp_path):
  """save_mmdit writes a folder SD3Transformer2DModel.from_pretrained loads to the same
  outputs as our module on the (changed) params, and load_mmdit reads back bit for bit."""
  from diffusers import SD3Transformer2DModel
  from rft.weights.mmdit import load_mmdit, save_mmdit
  cfg, model, params = load_mmdit(tiny_sd3)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  params = jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape)
                                     for a, k in zip(leaves, keys)])
  out = save_mmdit(str(tmp_path / "transformer"), cfg, params)
  cfg2, _, params2 = load_mmdit(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  ref = SD3Transformer2DModel.from_pretrained(out).eval()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 16)).astype(np.float32)
  y = rng.standard_normal((2, 5, 48)).astype(np.float32)
  pooled = rng.standard_normal((2, 32)).astype(np.float32)
  t = np.array([1000.0, 321.5], np.float32)
  ours = np.asarray(model.apply({"params": params}, x, t, y, pooled))
  with torch.no_grad():
    theirs = ref(_nchw(x), encoder_hidden_states=torch.from_numpy(y),
                 pooled_projections=torch.from_numpy(pooled),
                 timestep=torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
  assert np.abs(ours - theirs).max() <= TOL
  bad = jax.tree.map(lambda a: a, params)
  bad["proj_out"]["bias"] = bad["proj_out"]["bias"] * np.nan
  with pytest.raises(ValueError, match="NaN"):
    save_mmdit(str(tmp_path / "nan"), cfg, bad)


def test_clip_text_encoder_prefers_model_safetensors(tmp_path):
  """A text_encoder/ folder with model.safetensors and model.fp16.safetensors (as hub SD
  folders have) loads the float32 file only."""
  from safetensors.numpy import load_file, save_file
  from transformers import CLIPTextConfig, CLIPTextModel
  from rft.weights.clip import load_clip_text_encoder
  torch.manual_seed(0)
  hf = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    max_position_embeddings=8, bos_token_id=0, eos_token_id=2,
                                    pad_token_id=1)).eval()
  folder = tmp_path / "text_encoder"
  hf.save_pretrained(str(folder), safe_serialization=True)
  state = load_file(str(folder / "model.safetensors"))
  save_file({k: (v * 0 + 1).astype(np.float16) for k, v in state.items()},
            str(folder / "model.fp16.safetensors"), metadata={"format": "pt"})
  _, model, params = load_clip_text_encoder(str(tmp_path), subfolder="text_encoder")
  ids = np.array([[0, 5, 7, 9, 2, 1, 1, 1]], np.int32)
  ours = np.asarray(model.apply({"params": params}, ids)["last_hidden_state"])
  with torch.no_grad():
    theirs = hf(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  assert np.abs(ours - theirs).max() <= TOL


def test_online_loop_on_tiny_sd3(tmp_path, tiny_sd3):
  """Flow-GRPO (with its step KL) runs on a diffusers SD3 folder (world "sd3": the MMDiT
  trained, the three text encoders and the VAE frozen, a reward on decoded images); the
  finetuned MMDiT is exported in diffusers format, loads with diffusers and differs from
  the base only in the transformer."""
  from diffusers import SD3Transformer2DModel
  work = tmp_path / "work"
  t0 = time.time()
  # flow_grpo's base_dir is the ShapesWorld flow base; the SD3 world does not read it.
  run_main("configs/flow_grpo.py:smoke", work, "--config.world=sd3",
           f"--config.model_path={tiny_sd3}", "--config.base_dir=",
           "--config.reward=brightness", "--config.max_sequence_length=8",
           "--config.eval_prompts=8", "--config.eval_batch_size=8", "--config.lr=1e-2",
           timeout=900)
  print(f"SD3 online loop: {time.time() - t0:.1f} s")
  results = json.load(open(work / "results.json"))
  assert "train/reward_brightness" in results["history"]["2"]
  tuned = SD3Transformer2DModel.from_pretrained(str(work / "transformer"))
  base = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
  diffs = {k: float((v - base.state_dict()[k]).abs().max()) for k, v in tuned.state_dict().items()}
  assert diffs["pos_embed.pos_embed"] == 0.0
  assert sum(d > 0 for d in diffs.values()) > len(diffs) // 2, diffs
  meta = json.load(open(work / "transformer" / "rft_finetune.json"))
  assert meta["objective"] == "flow_grpo"


def test_default_trainable_selects_the_mmdit():
  import re
  from rft.configs import common
  c = common.base()
  paths = ["transformer/transformer_blocks_0/attn/to_q/kernel", "text_encoder/x", "vae/y",
           "transformer/transformer_blocks_0/attn/add_k_proj/kernel",
           "transformer/transformer_blocks_0/ff/net_2/kernel"]
  assert [bool(re.search(c.finetune.trainable, p)) for p in paths] == [True, False, False,
                                                                        True, True]
  assert [bool(re.search(c.finetune.lora_targets, p)) for p in paths] == [True, False, False,
                                                                          True, False]
  common.sd3_world(c, "some/folder")
  assert c.world == "sd3" and c.sampler.name == "flow" and c.base_dir == ""
