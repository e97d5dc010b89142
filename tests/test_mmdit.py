"""SD3Transformer (rft.models.mmdit) and its diffusers loader against diffusers on torch CPU.

Tiny random ``diffusers.SD3Transformer2DModel``s are perturbed (so zero-initialised and
unit-initialised params do not hide conversion errors), saved with
``save_pretrained(safe_serialization=True)`` into a pipeline-shaped folder
(``model_index.json`` + ``transformer/``), loaded with ``load_mmdit`` and compared on the
same inputs (NCHW vs NHWC).
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

from rft.models.mmdit import MMDiTConfig  # noqa: E402
from rft.weights import mmdit as mmdit_weights  # noqa: E402
from rft.weights.mmdit import load_mmdit, mmdit_from_diffusers  # noqa: E402
from tests.sd_fixtures import perturb_  # noqa: E402

# Tests check semantics, not speed: skip XLA's backend optimisations.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = 1e-4
B, L = 2, 5

_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
             pooled_projection_dim=10, out_channels=4)
# name -> (diffusers config, latent (H, W)). Both SD3 configs crop a 6x6-patch table
# (pos_embed_max_size=6 > sample_size / patch_size = 4) to a non-square latent.
CONFIGS = {
    "sd3": (dict(_TINY, pos_embed_max_size=6), (8, 12)),
    "sd35": (dict(_TINY, pos_embed_max_size=6, qk_norm="rms_norm", dual_attention_layers=(0,),
                  num_layers=3, out_channels=6), (10, 6)),
    # No max size: the table is computed for the latent's own (here non-square) grid.
    "no_max": (dict(_TINY, pos_embed_max_size=None, patch_size=1, num_layers=1), (6, 10)),
}


def _build(name, root):
  torch.manual_seed(0)
  model = diffusers.SD3Transformer2DModel(**CONFIGS[name][0])
  perturb_(model, scale=0.05, seed=1).eval()
  model.save_pretrained(os.path.join(root, "transformer"), safe_serialization=True)
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusion3Pipeline",
               "transformer": ["diffusers", "SD3Transformer2DModel"]}, f)
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
def _fn(module):
  return jax.jit(lambda p, *a: module.apply({"params": p}, *a), compiler_options=_FAST)


def _inputs(config, hw, seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *s: rng.normal(size=s).astype(np.float32)
  x = f32(B, config.in_channels, *hw)
  t = np.array([1000.0 * 0.3, 1000.0 * 0.875], np.float32)[:B]
  y = f32(B, L, config.joint_attention_dim)
  pooled = f32(B, config.pooled_projection_dim)
  return x, t, y, pooled


def _torch_out(model, x, t, y, pooled):
  with torch.no_grad():
    return model(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(y),
                 pooled_projections=torch.from_numpy(pooled),
                 timestep=torch.from_numpy(t)).sample.numpy()


def _ours(module, params, x, t, y, pooled):
  return _fn(module)(params, jnp.asarray(np.transpose(x, (0, 2, 3, 1))), jnp.asarray(t),
                     jnp.asarray(y), jnp.asarray(pooled))


def _nchw(a):
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


def _err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(ref, name):
  model, root = ref(name)
  config, module, params = load_mmdit(root)
  assert config == MMDiTConfig.from_diffusers(dict(model.config))
  assert config.to_diffusers() == {k: (list(v) if isinstance(v, tuple) else v)
                                   for k, v in dict(model.config).items()
                                   if not k.startswith("_")}
  inputs = _inputs(config, CONFIGS[name][1])
  want = _torch_out(model, *inputs)
  got = _ours(module, params, *inputs)
  assert got.dtype == jnp.float32
  assert got.shape == (B, *CONFIGS[name][1], config.out_channels)
  err = _err(_nchw(got), want)
  print(f"{name}: max abs err {err:.2e} (|out| <= {np.abs(want).max():.2f})")
  assert err <= TOL


def test_bfloat16_compute(ref):
  """bf16 compute with f32 params: float32 outputs close to the f32 ones."""
  _, root = ref("sd35")
  config, module, params = load_mmdit(root)
  inputs = _inputs(config, CONFIGS["sd35"][1])
  f32 = _ours(module, params, *inputs)
  bf16 = _ours(module.clone(dtype=jnp.bfloat16), params, *inputs)
  assert bf16.dtype == jnp.float32
  rel = _err(bf16, f32) / float(jnp.max(jnp.abs(f32)))
  print(f"bf16: max abs err / max |out| = {rel:.3f}")
  assert 0 < rel < 0.05


def test_input_gradient_matches_torch_and_remat(ref):
  """d sum(w * out) / d latents against torch autograd, with and without remat; a scalar
  timestep broadcasts over the batch."""
  model, root = ref("sd35")
  config, module, params = load_mmdit(root)
  hw = CONFIGS["sd35"][1]
  x, _, y, pooled = _inputs(config, hw)
  w = np.random.default_rng(3).normal(size=(B, config.out_channels, *hw)).astype(np.float32)
  xt = torch.from_numpy(x).requires_grad_(True)
  out = model(hidden_states=xt, encoder_hidden_states=torch.from_numpy(y),
              pooled_projections=torch.from_numpy(pooled),
              timestep=torch.full((B,), 437.5)).sample
  (out * torch.from_numpy(w)).sum().backward()
  want = xt.grad.numpy()
  wj = jnp.asarray(np.transpose(w, (0, 2, 3, 1)))
  for mod in (module, module.clone(remat=True)):
    def loss(xx, m=mod):
      o = m.apply({"params": params}, xx, jnp.float32(437.5), jnp.asarray(y),
                  jnp.asarray(pooled))
      return jnp.sum(wj * o)
    got = jax.jit(jax.grad(loss), compiler_options=_FAST)(
        jnp.asarray(np.transpose(x, (0, 2, 3, 1))))
    err = _err(_nchw(got), want)
    print(f"input grad (remat={mod.remat}): max abs err {err:.2e} "
          f"(|grad| <= {np.abs(want).max():.2f})")
    assert err <= TOL


def _state(root):
  from safetensors.numpy import load_file
  return load_file(os.path.join(root, "transformer", "diffusion_pytorch_model.safetensors"))


def _config_dict(root):
  with open(os.path.join(root, "transformer", "config.json")) as f:
    return json.load(f)


def _flat(params):
  return {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def test_sharded_and_transformer_folder(ref, tmp_path):
  """The transformer folder itself, and a sharded checkpoint (index + shards), load to the
  same params as the pipeline folder."""
  model, root = ref("sd35")
  _, _, params = load_mmdit(root)
  _, _, direct = load_mmdit(os.path.join(root, "transformer"))
  sharded = str(tmp_path / "sharded")
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
  assert os.path.isfile(os.path.join(sharded, "diffusion_pytorch_model.safetensors.index.json"))
  _, _, from_shards = load_mmdit(sharded)
  want = _flat(params)
  for other in (direct, from_shards):
    got = _flat(other)
    assert set(got) == set(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_unsupported_config_raises(ref, tmp_path):
  _, root = ref("sd3")
  d = _config_dict(root)
  with pytest.raises(ValueError, match="frobnicate"):
    MMDiTConfig.from_diffusers(dict(d, frobnicate=3))
  with pytest.raises(ValueError, match="qk_norm='layer_norm'"):
    MMDiTConfig.from_diffusers(dict(d, qk_norm="layer_norm"))
  with pytest.raises(ValueError, match="_class_name"):
    MMDiTConfig.from_diffusers(dict(d, _class_name="FluxTransformer2DModel"))
  with pytest.raises(ValueError, match="caption_projection_dim"):
    MMDiTConfig.from_diffusers(dict(d, caption_projection_dim=24))
  with pytest.raises(ValueError, match="dual_attention_layers"):
    MMDiTConfig.from_diffusers(dict(d, dual_attention_layers=[5]))
  # Through the loader: the error names the file and the key.
  folder = tmp_path / "transformer"
  folder.mkdir()
  with open(folder / "config.json", "w") as f:
    json.dump(dict(d, frobnicate=3), f)
  with pytest.raises(ValueError, match=r"config\.json.*frobnicate"):
    load_mmdit(str(tmp_path))


def test_bad_weights_raise(ref):
  _, root = ref("sd35")
  config = MMDiTConfig.from_diffusers(_config_dict(root))
  state = _state(root)
  missing = "transformer_blocks.2.attn.add_q_proj.weight"
  with pytest.raises(ValueError, match=r"missing key.*" + missing.replace(".", r"\.")):
    mmdit_from_diffusers({k: v for k, v in state.items() if k != missing}, config)
  with pytest.raises(ValueError, match=r"unexpected key.*transformer_blocks\.1\.attn2"):
    mmdit_from_diffusers(dict(state, **{"transformer_blocks.1.attn2.to_q.weight":
                                        state["transformer_blocks.0.attn2.to_q.weight"]}),
                         config)
  bad = dict(state)
  bad["proj_out.weight"] = bad["proj_out.weight"][:-1]
  with pytest.raises(ValueError, match=r"wrong shape for proj_out\.weight"):
    mmdit_from_diffusers(bad, config)
  bad = dict(state)
  bad["pos_embed.pos_embed"] = bad["pos_embed.pos_embed"] + 0.01
  with pytest.raises(ValueError, match=r"pos_embed\.pos_embed differs"):
    mmdit_from_diffusers(bad, config)
  # Without the (derived) buffer the params are the same.
  no_buffer = {k: v for k, v in state.items() if k != "pos_embed.pos_embed"}
  a, b = _flat(mmdit_from_diffusers(state, config)), _flat(mmdit_from_diffusers(no_buffer,
                                                                                config))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert set(mmdit_weights.expected_shapes(config)) == {
      tuple(getattr(p, "key", str(p)) for p in k) for k in a}


def test_latent_larger_than_pos_embed_max_raises(ref):
  _, root = ref("sd3")
  config, module, params = load_mmdit(root)
  with pytest.raises(ValueError, match="pos_embed_max_size"):
    _ours(module, params, *_inputs(config, (14, 8)))


def test_param_structure():
  """Dual attention where configured; the last block reads the text stream only (no text
  output projection / FF) but keeps the text q projection and its norm, as diffusers."""
  config = MMDiTConfig(**dict(_TINY, pos_embed_max_size=6, dual_attention_layers=(0, 1),
                              qk_norm="rms_norm"))
  got = mmdit_weights.expected_shapes(config)
  last = "transformer_blocks_1"
  assert got[(last, "attn2", "norm_q", "scale")] == (8,)
  assert got[(last, "norm1", "linear", "kernel")] == (16, 9 * 16)
  assert got[(last, "norm1_context", "linear", "kernel")] == (16, 2 * 16)
  assert got[(last, "attn", "add_q_proj", "kernel")] == (16, 16)
  assert got[(last, "attn", "norm_added_q", "scale")] == (8,)
  assert not any(k[0] == last and k[1] in ("ff_context", "norm2_context") for k in got)
  assert (last, "attn", "to_add_out", "kernel") not in got
  assert got[("pos_embed", "proj", "kernel")] == (2, 2, 4, 16)
  assert got[("transformer_blocks_0", "ff", "net_0", "proj", "kernel")] == (16, 64)
