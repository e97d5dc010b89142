"""AutoencoderKL (rft.models.vae) and its diffusers loader against diffusers on torch CPU.

Tiny random ``diffusers.AutoencoderKL`` models are perturbed (non-trivial norms and
biases), saved with ``save_pretrained(safe_serialization=True)`` into a pipeline-shaped
folder, loaded with ``load_vae`` and compared on the same inputs (NCHW vs NHWC): encoder
moments, decoder outputs, the scaled-latent helpers and decoder input gradients.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from rft.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from rft.weights import vae as vae_weights  # noqa: E402
from rft.weights.vae import load_vae  # noqa: E402

# Tests check semantics, not speed: skip XLA's backend optimisations.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = 1e-4

# name -> diffusers AutoencoderKL kwargs. Together: 2 and 3 levels, 1 and 2 layers per
# block, 8 and 16 groups, with/without (post_)quant_conv, with/without the mid attention,
# SD / SDXL / SD3-like scaling and shift.
CONFIGS = {
    "sd": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
               latent_channels=4),
    "sdxl_deep": dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=16,
                      latent_channels=4, scaling_factor=0.13025),
    "sd3_like": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                     latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                     use_quant_conv=False, use_post_quant_conv=False,
                     mid_block_add_attention=False),
}
B, H, W = 2, 16, 24  # non-square: catches H/W mix-ups in the asymmetric downsample pad


def _build(name, root):
  kw = dict(CONFIGS[name])
  n = len(kw["block_out_channels"])
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **kw).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  model.save_pretrained(os.path.join(root, "vae"), safe_serialization=True)
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]},
              f)
  return model


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      root = str(tmp_path_factory.mktemp(name))
      cache[name] = (_build(name, root), root)
    return cache[name]

  return get


@functools.lru_cache(maxsize=None)
def _fn(module, method):
  return jax.jit(lambda p, x: module.apply({"params": p}, x, method=method),
                 compiler_options=_FAST)


def _images(seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (B, 3, H, W)).astype(np.float32)


def _latents(config, seed=1):
  f = config.downscale
  shape = (B, config.latent_channels, H // f, W // f)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _nhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def _nchw(a):
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


def _err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _all_outputs(m, x, z, key):
  mu, lv = m.encode(x)
  return dict(mean=mu, logvar=lv, decode=m.decode(z), latents=m.images_to_latents(x),
              sampled=m.images_to_latents(x, key), images=m.latents_to_images(z))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(ref, name):
  model, root = ref(name)
  config, module, params = load_vae(root)
  assert config.scaling_factor == model.config.scaling_factor
  assert config.shift_factor == (model.config.shift_factor or 0.0)
  assert config == VAEConfig.from_diffusers(dict(model.config))
  x, z = _images(), _latents(config)
  s, shift = config.scaling_factor, config.shift_factor
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(x)).latent_dist
    mean, logvar, std = dist.mean.numpy(), dist.logvar.numpy(), dist.std.numpy()
    image = model.decode(torch.from_numpy(z)).sample.numpy()
    # The pipeline convention: images = decode(latents / scaling + shift).
    image_of_latents = model.decode(torch.from_numpy(z / s + shift)).sample.numpy()
  key = jax.random.PRNGKey(3)
  run = jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=_all_outputs),
                compiler_options=_FAST)
  out = run(params, _nhwc(x), _nhwc(z), key)
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert out["decode"].shape == (B, H, W, 3) and out["mean"].shape == _nhwc(z).shape
  eps = _nchw(jax.random.normal(key, out["mean"].shape))
  want = dict(mean=mean, logvar=logvar, decode=image, images=image_of_latents,
              latents=(mean - shift) * s,  # latents = (mean - shift) * scaling
              sampled=(mean + std * eps - shift) * s)  # a posterior sample, eps from key
  assert set(out) == set(want)
  errs = {k: _err(_nchw(out[k]), want[k]) for k in want}
  print(f"{name}: max abs errs " + " ".join(f"{k} {v:.1e}" for k, v in errs.items())
        + f" (|image| <= {np.abs(image).max():.2f})")
  assert max(errs.values()) <= TOL, errs


def test_decoder_gradient_matches_torch_and_remat(ref):
  """Reward backprop goes through the decoder: d sum(w * decode(z)) / dz against torch
  autograd, with and without rematerialisation."""
  model, root = ref("sd")
  config, module, params = load_vae(root)
  z = _latents(config)
  w = np.random.default_rng(2).normal(size=(B, 3, H, W)).astype(np.float32)
  zt = torch.from_numpy(z).requires_grad_(True)
  (model.decode(zt).sample * torch.from_numpy(w)).sum().backward()
  want = zt.grad.numpy()
  wj = _nhwc(w)
  for mod in (module, AutoencoderKL(config, remat=True)):
    loss = lambda zz, m=mod: jnp.sum(wj * m.apply({"params": params}, zz, method="decode"))
    got = jax.jit(jax.grad(loss), compiler_options=_FAST)(_nhwc(z))
    err = _err(_nchw(got), want)
    print(f"decoder grad (remat={mod.remat}): max abs err {err:.2e} "
          f"(|grad| <= {np.abs(want).max():.2f})")
    assert err <= TOL


def test_bfloat16_compute(ref):
  """bf16 compute with f32 params: float32 outputs close to the f32 ones."""
  _, root = ref("sd")
  config, module, params = load_vae(root)
  z = _nhwc(_latents(config))
  f32 = _fn(module, "decode")(params, z)
  bf16 = _fn(module.clone(dtype=jnp.bfloat16), "decode")(params, z)
  assert bf16.dtype == jnp.float32
  rel = _err(bf16, f32) / float(jnp.max(jnp.abs(f32)))
  print(f"bf16 decode: max abs err / max |image| = {rel:.3f}")
  assert 0 < rel < 0.05


def _state(root):
  from safetensors.numpy import load_file
  return load_file(os.path.join(root, "vae", "diffusion_pytorch_model.safetensors"))


def _write_vae(folder, state, config_dict):
  from safetensors.numpy import save_file
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config_dict, f)
  save_file(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  return folder


def _config_dict(root):
  with open(os.path.join(root, "vae", "config.json")) as f:
    return json.load(f)


def test_legacy_attention_keys_and_conv_shaped_weights(ref, tmp_path):
  """query/key/value/proj_attn (older SD VAE files) and [C, C, 1, 1] attention weights
  load to the same params as the current spelling."""
  model, root = ref("sd")
  _, _, params = load_vae(root)
  legacy = {}
  for k, v in _state(root).items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      if f".attentions.0.{new}." in k:
        k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        if k.startswith("encoder") and k.endswith(".weight"):
          v = v[:, :, None, None]  # 1x1-conv layout
    legacy[k] = v
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  assert legacy["encoder.mid_block.attentions.0.query.weight"].ndim == 4
  folder = _write_vae(str(tmp_path / "legacy"), legacy, _config_dict(root))
  _, _, got = load_vae(folder)
  flat, flat_got = jax.tree_util.tree_leaves_with_path(params), dict(
      jax.tree_util.tree_leaves_with_path(got))
  assert len(flat) == len(flat_got)
  for path, v in flat:
    np.testing.assert_array_equal(np.asarray(flat_got[path]), np.asarray(v))
  # diffusers itself reads the legacy (2-D) spelling to the same model.
  legacy2d = {k: (v[:, :, 0, 0] if ".attentions.0." in k and v.ndim == 4 else v)
              for k, v in legacy.items()}
  folder2 = _write_vae(str(tmp_path / "legacy2d"), legacy2d, _config_dict(root))
  reloaded = diffusers.AutoencoderKL.from_pretrained(folder2).eval()
  for k, v in model.state_dict().items():
    assert torch.equal(reloaded.state_dict()[k], v), k


def test_folder_layouts_and_hub_cache(ref, tmp_path, monkeypatch):
  """The vae folder itself; a pipeline folder holding an extra fp16 variant; a hub id in
  the local HF cache."""
  _, root = ref("sd")
  _, _, params = load_vae(root)
  leaves = jax.tree_util.tree_leaves(params)
  same = lambda p: all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree_util.tree_leaves(p)))
  assert same(load_vae(os.path.join(root, "vae"))[2])

  snap = tmp_path / "hub" / "models--org--tiny-sd" / "snapshots" / "abc123"
  shutil.copytree(root, snap)
  vae_dir = snap / "vae"
  state16 = {k: v.astype(np.float16) for k, v in _state(root).items()}
  from safetensors.numpy import save_file
  save_file(state16, str(vae_dir / "diffusion_pytorch_model.fp16.safetensors"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  assert same(load_vae("org/tiny-sd")[2])  # the fp32 file, not both
  _, _, p16 = load_vae("org/tiny-sd", variant="fp16")
  assert _err(jax.tree_util.tree_leaves(p16)[0], leaves[0]) < 1e-2
  assert not same(p16)


def test_error_missing_and_wrong_shape(ref, tmp_path):
  _, root = ref("sd")
  state, cfg = _state(root), _config_dict(root)
  missing = dict(state)
  del missing["decoder.mid_block.attentions.0.to_q.weight"]
  folder = _write_vae(str(tmp_path / "missing"), missing, cfg)
  with pytest.raises(ValueError, match=r"missing key.*decoder\.mid_block\.attentions\.0\.to_q"
                     r"\.weight"):
    load_vae(folder)

  wrong = dict(state)
  wrong["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  folder = _write_vae(str(tmp_path / "wrong"), wrong, cfg)
  with pytest.raises(ValueError, match=r"wrong shape for encoder\.conv_in\.weight.*\(32, 3, 5, 5\)"
                     r".*\(32, 3, 3, 3\)"):
    load_vae(folder)

  extra = dict(state)
  extra["decoder.mid_block.attentions.0.to_out.1.weight"] = np.zeros((64, 64), np.float32)
  folder = _write_vae(str(tmp_path / "extra"), extra, cfg)
  with pytest.raises(ValueError, match=r"unexpected key.*to_out\.1\.weight"):
    load_vae(folder)

  both = dict(state)  # legacy and current spelling of the same weight
  both["encoder.mid_block.attentions.0.query.bias"] = both[
      "encoder.mid_block.attentions.0.to_q.bias"]
  folder = _write_vae(str(tmp_path / "both"), both, cfg)
  with pytest.raises(ValueError, match="two checkpoint keys map to"):
    load_vae(folder)


def test_error_pickle_only_with_allow_pickle(ref, tmp_path):
  model, root = ref("sd")
  folder = tmp_path / "pickled" / "vae"
  model.save_pretrained(str(folder), safe_serialization=False)
  assert (folder / "diffusion_pytorch_model.bin").exists()
  assert not list(folder.glob("*.safetensors"))
  with pytest.raises(ValueError, match="allow_pickle=True"):
    load_vae(str(tmp_path / "pickled"))
  _, _, params = load_vae(str(tmp_path / "pickled"), allow_pickle=True)
  for a, b in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(load_vae(root)[2])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_error_missing_folder_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere.*vae/config\.json.*"
                     r"diffusion_pytorch_model\.safetensors"):
    load_vae(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty/vae/config\.json"):
    load_vae(str(tmp_path / "empty"))
  vae = tmp_path / "noweights" / "vae"
  vae.mkdir(parents=True)
  (vae / "config.json").write_text(json.dumps({"block_out_channels": [32, 64]}))
  with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model\.safetensors"):
    load_vae(str(tmp_path / "noweights"))


@pytest.mark.parametrize("key,value,match", [
    ("act_fn", "gelu", r"act_fn='gelu'"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
     r"down_block_types=.*AttnDownEncoderBlock2D"),
    ("latents_mean", [0.1, 0.2, 0.3, 0.4], r"latents_mean=\[0\.1"),
    ("norm_type", "spatial", r"unsupported config key norm_type='spatial'"),
    ("_class_name", "AutoencoderTiny", r"_class_name='AutoencoderTiny'"),
    ("norm_num_groups", 12, r"divisible by norm_num_groups=12"),
])
def test_error_unsupported_config(ref, tmp_path, key, value, match):
  _, root = ref("sd")
  cfg = _config_dict(root)
  cfg[key] = value
  folder = _write_vae(str(tmp_path / "vae"), _state(root), cfg)
  with pytest.raises(ValueError, match=r"config\.json: .*" + match):
    load_vae(folder)


def test_config_ignores_harmless_keys_and_round_trips():
  d = dict(_class_name="AutoencoderKL", _diffusers_version="0.42.1", sample_size=512,
           force_upcast=True, act_fn="silu", block_out_channels=[128, 256, 512, 512],
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
           norm_num_groups=32, scaling_factor=0.13025, shift_factor=None, latents_mean=None,
           latents_std=None)
  c = VAEConfig.from_diffusers(d)
  assert c == VAEConfig(scaling_factor=0.13025) and c.downscale == 8
  assert VAEConfig.from_diffusers(c.to_diffusers()) == c
  with pytest.raises(ValueError, match="up_block_types has 3 entries"):
    VAEConfig.from_diffusers(dict(d, up_block_types=["UpDecoderBlock2D"] * 3))
  # The SD 1.x VAE's param count (83.65M), from the shapes alone.
  n = sum(int(np.prod(s)) for s in vae_weights.expected_shapes(c).values())
  assert n == 83_653_863, n
