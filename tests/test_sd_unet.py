"""UNet2DCondition and its diffusers loader against diffusers' UNet2DConditionModel (torch CPU).

Tiny random UNets are built with diffusers, every parameter perturbed (so zero or unit
inits hide nothing), saved as a pipeline folder (``model_index.json`` + ``unet/`` in
safetensors), loaded with ``load_unet`` and compared output by output (NCHW <-> NHWC).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from rft.models import sd_unet  # noqa: E402
from rft.models.sd_unet import UNet2DCondition, UNetConfig  # noqa: E402
from rft.weights.sd_unet import (load_unet, save_unet, unet_from_diffusers,  # noqa: E402
                                 unet_to_diffusers)

# Tests check semantics, not speed: skip XLA's backend optimisations.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

CONFIGS = {
    # SD 1.x-like: conv proj_in/out, int attention_head_dim (= heads), 2 layers per block.
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
    # SD 2.x-like: linear projections, per-block heads (reversed on the way up, head dims
    # 16/16/8), upcast attention, per-block layers and transformer depths, plus the
    # time-embedding and scale options SD does not vary.
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=(1, 2, 1),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=48, attention_head_dim=(2, 4, 8), norm_num_groups=8,
                use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=(1, 2, 1), norm_eps=1e-6,
                mid_block_scale_factor=0.7, flip_sin_to_cos=False, freq_shift=1,
                center_input_sample=True),
}
B, L = 2, 7


def _build(name, root):
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(sample_size=16, **CONFIGS[name]).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline",
               "unet": ["diffusers", "UNet2DConditionModel"]}, f)
  model.save_pretrained(os.path.join(root, "unet"), safe_serialization=True)
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


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST)
def _apply(module, params, x, t, ctx):
  return module.apply({"params": params}, x, t, ctx)


def _inputs(name, hw=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, 4, hw, hw)).astype(np.float32)
  ctx = rng.standard_normal((B, L, CONFIGS[name]["cross_attention_dim"])).astype(np.float32)
  return x, ctx


def _torch_out(model, x, t, ctx):
  tt = torch.as_tensor(t) if isinstance(t, np.ndarray) else t
  with torch.no_grad():
    return model(torch.from_numpy(x), tt, torch.from_numpy(ctx)).sample.numpy()


def _ours(module, params, x, t, ctx):
  out = _apply(module, params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
               jnp.asarray(ctx))
  return np.asarray(out).transpose(0, 3, 1, 2)


def _check(name, ours, want, tol=1e-4):
  err = float(np.max(np.abs(ours - want)))
  print(f"{name}: max abs error {err:.2e} (output scale {np.abs(want).max():.2f})")
  assert ours.shape == want.shape and err <= tol, (name, err)
  return err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(ref, name):
  model, root = ref(name)
  config, module, params = load_unet(root)
  assert isinstance(module, UNet2DCondition) and module.config == config
  assert config.use_linear_projection == (name == "sd2")
  x, ctx = _inputs(name)
  t = np.array([3, 871])  # per-example integer timesteps
  _check(name, _ours(module, params, x, t, ctx), _torch_out(model, x, t, ctx))


def test_timestep_forms(ref):
  """A Python int scalar (broadcast over the batch) and a fractional float vector."""
  model, root = ref("sd1")
  _, module, params = load_unet(os.path.join(root, "unet"))  # the unet folder itself
  x, ctx = _inputs("sd1", seed=1)
  for t_ours, t_ref in [(500, 500), (np.array([0.5, 999.25], np.float32),) * 2]:
    ours = _ours(module, params, x, t_ours, ctx)
    _check(f"t={t_ref}", ours, _torch_out(model, x, t_ref, ctx))
  assert not np.allclose(_ours(module, params, x, 10, ctx), _ours(module, params, x, 20, ctx))


def test_odd_resolution_and_chunked_attention(ref, monkeypatch):
  """10x10 latents (5 -> 3 on the way down, so Upsample2D resizes to the skip's size)
  and a tiny ``_CPU_BLOCK`` so attention takes the chunked (lax.map) path."""
  model, root = ref("sd2")
  _, module, params = load_unet(root)
  monkeypatch.setattr(sd_unet, "_CPU_BLOCK", 512)
  x, ctx = _inputs("sd2", hw=10, seed=2)
  t = np.array([250, 7])
  _check("sd2 10x10 chunked", _ours(module, params, x, t, ctx),
         _torch_out(model, x, t, ctx))


def test_chunked_attention_gradients_match(monkeypatch):
  """The chunked CPU attention (rematerialised in backward) has the same gradients."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 64, 2, 8)), jnp.float32) for _ in range(3))
  f = lambda q, k, v: jnp.sum(jnp.sin(sd_unet.attention(q, k, v)))
  full = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  direct = jax.nn.dot_product_attention(q, k, v)
  # 2*2*64*64 logits: 4096 -> one block per (batch, head); 256 -> also 16 query chunks
  for block in (4096, 256):
    monkeypatch.setattr(sd_unet, "_CPU_BLOCK", block)
    np.testing.assert_allclose(sd_unet.attention(q, k, v), direct, atol=1e-5)
    chunked = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(full, chunked):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_compute(ref):
  model, root = ref("sd1")
  _, module, params = load_unet(root)
  x, ctx = _inputs("sd1")
  t = np.array([100, 600])
  out = _ours(module.clone(dtype=jnp.bfloat16), params, x, t, ctx)
  want = _torch_out(model, x, t, ctx)
  assert out.dtype == np.float32
  rel = np.max(np.abs(out - want)) / np.max(np.abs(want))
  assert rel < 0.05, rel


def test_round_trip_to_diffusers(ref, tmp_path):
  model, root = ref("sd2")
  config, module, params = load_unet(root)
  # finetuning stand-in: change every param, then save and reload with diffusers
  params = jax.tree.map(lambda p: np.asarray(p) * 1.01 + 0.001, params)
  state = unet_to_diffusers(params, config)
  want = {k: v.numpy() for k, v in model.state_dict().items()}
  assert sorted(state) == sorted(want)
  for k in want:
    np.testing.assert_allclose(state[k], want[k] * 1.01 + 0.001, atol=1e-6, err_msg=k)
  save_unet(tmp_path / "unet", config, params)
  reloaded = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
  x, ctx = _inputs("sd2", seed=3)
  t = np.array([5, 500])
  _check("round trip", _ours(module, params, x, t, ctx), _torch_out(reloaded, x, t, ctx))
  # and from the original config dict (its extra keys survive)
  with open(os.path.join(root, "unet", "config.json")) as f:
    d = json.load(f)
  save_unet(tmp_path / "unet2", d, params)
  with open(tmp_path / "unet2" / "config.json") as f:
    assert json.load(f)["_diffusers_version"] == d["_diffusers_version"]
  again = load_unet(tmp_path / "unet2")[2]
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), again, params))


def test_sharded_and_hub_cache(ref, tmp_path, monkeypatch):
  model, root = ref("sd1")
  snap = tmp_path / "hub" / "models--org--tiny-sd" / "snapshots" / "abc123"
  os.makedirs(snap)
  with open(snap / "model_index.json", "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline"}, f)
  model.save_pretrained(str(snap / "unet"), safe_serialization=True, max_shard_size="100KB")
  assert os.path.isfile(snap / "unet" / "diffusion_pytorch_model.safetensors.index.json")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  _, _, params = load_unet("org/tiny-sd")
  _, _, want = load_unet(root)
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), params, want))


# ----------------------------------------------------------------------------- errors


def _state(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_missing_and_wrong_shape_keys(ref):
  model, root = ref("sd1")
  config = load_unet(root)[0]
  key = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"
  state = _state(model)
  del state[key]
  with pytest.raises(ValueError, match=r"missing key.*attn2\.to_k\.weight"):
    unet_from_diffusers(state, config, source="ckpt")
  state = _state(model)
  state["conv_in.weight"] = state["conv_in.weight"][:, :3]
  with pytest.raises(ValueError, match=r"wrong shape for conv_in\.weight.*\(32, 4, 3, 3\)"):
    unet_from_diffusers(state, config, source="ckpt")
  state = _state(model)
  state["mid_block.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"unexpected key.*mid_block\.extra\.weight"):
    unet_from_diffusers(state, config, source="ckpt")
  with pytest.raises(ValueError, match="params do not match"):
    unet_to_diffusers({"conv_in": {}}, config)


def test_pickle_only_folder(ref, tmp_path):
  model, _ = ref("sd1")
  model.save_pretrained(str(tmp_path / "unet"), safe_serialization=False)
  assert os.path.isfile(tmp_path / "unet" / "diffusion_pytorch_model.bin")
  with pytest.raises(ValueError, match="allow_pickle=True"):
    load_unet(tmp_path)
  _, module, params = load_unet(tmp_path, allow_pickle=True)
  x, ctx = _inputs("sd1")
  t = np.array([1, 2])
  _check("pickle", _ours(module, params, x, t, ctx), _torch_out(model, x, t, ctx))


def test_missing_folder_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
    load_unet(tmp_path / "nope")
  os.makedirs(tmp_path / "pipe" / "unet")
  with open(tmp_path / "pipe" / "model_index.json", "w") as f:
    json.dump({}, f)
  with pytest.raises(FileNotFoundError, match=r"unet/config\.json"):
    load_unet(tmp_path / "pipe")
  with open(tmp_path / "pipe" / "unet" / "config.json", "w") as f:
    json.dump(UNetConfig(block_out_channels=(32, 64), down_block_types=(
        "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=(
            "UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8).to_diffusers(), f)
  with pytest.raises(FileNotFoundError, match=r"no weights.*diffusion_pytorch_model"):
    load_unet(tmp_path / "pipe")


def test_unsupported_config(ref, tmp_path):
  _, root = ref("sd1")
  with open(os.path.join(root, "unet", "config.json")) as f:
    d = json.load(f)
  for key, value in [("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
                     ("resnet_time_scale_shift", "scale_shift"),
                     ("time_embedding_type", "fourier"), ("dual_cross_attention", True),
                     ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
                     ("some_new_option", 3)]:
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
      UNetConfig.from_diffusers({**d, key: value})
  with pytest.raises(ValueError, match="AttnDownBlock2D"):
    UNetConfig.from_diffusers({**d, "down_block_types": ["AttnDownBlock2D", "CrossAttnDownBlock2D",
                                                         "DownBlock2D"]})
  os.makedirs(tmp_path / "unet")
  with open(tmp_path / "unet" / "config.json", "w") as f:
    json.dump({**d, "class_embed_type": "projection"}, f)
  with pytest.raises(ValueError, match=r"config\.json.*class_embed_type='projection'"):
    load_unet(tmp_path)
  # harmless keys are ignored
  c = UNetConfig.from_diffusers({**d, "dropout": 0.1, "_name_or_path": "x"})
  assert c == UNetConfig.from_diffusers(d)
