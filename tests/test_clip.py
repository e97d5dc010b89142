"""CLIP towers (rft.models.clip) and their loaders (rft.weights.clip) against the references.

Tiny random ``transformers`` CLIP models and ``open_clip.CLIP`` models are built on torch
CPU, perturbed (so LayerNorm weights and biases are not at their trivial init), saved the
way published checkpoints are (safetensors; a pickled, DDP-prefixed state dict for
HPSv2-style open_clip files), loaded with our loaders and compared on the same inputs
(images transposed NCHW -> NHWC): max abs error <= 1e-4 in float32.
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
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from rft.models import clip as mclip  # noqa: E402
from rft.models import open_clip as moc  # noqa: E402
from rft.weights import clip as wclip  # noqa: E402
from rft.weights import io  # noqa: E402
from tests.helpers import import_open_clip  # noqa: E402

_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _jitted(model, method):
  def f(params, *args):
    return model.apply({"params": params}, *args, method=method)
  return jax.jit(f, compiler_options=_FAST)


def run(model, params, *args, method="__call__"):
  out = _jitted(model, method)(params, *[jnp.asarray(a) for a in args])
  return jax.tree_util.tree_map(np.asarray, out)


def err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _perturb(model, seed=1, scale=0.1):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return model.eval()


def _t(x):
  return torch.as_tensor(np.asarray(x))


def _nchw(images_nhwc):
  return _t(np.ascontiguousarray(np.transpose(images_nhwc, (0, 3, 1, 2))))


def _images(b, size, seed=0, channels=3):
  return np.random.default_rng(seed).normal(size=(b, size, size, channels)).astype(np.float32)


# ----------------------------------------------------------------------------- configs

_TEXT = {
    # SD 1.x-like: OpenAI text tower, quick_gelu, legacy eos_token_id == 2 (argmax pooling).
    "sd1": dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                projection_dim=8, eos_token_id=2, bos_token_id=1, pad_token_id=0),
    # SD 2.x-like: OpenCLIP-H text tower in HF format, gelu, eos id pooling (not the max id).
    "sd2": dict(vocab_size=100, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=6, max_position_embeddings=12, hidden_act="gelu",
                layer_norm_eps=1e-6, projection_dim=8, eos_token_id=97, bos_token_id=96,
                pad_token_id=0),
}
_VISION = {
    "a": dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=40,
              num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu",
              projection_dim=12),
    "b": dict(image_size=18, patch_size=6, hidden_size=24, intermediate_size=36,
              num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu",
              layer_norm_eps=1e-6, projection_dim=8),
}


def _hf(cls_name, config):
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(0)
  return _perturb(getattr(transformers, cls_name)(config))


def _save_legacy_text(model, d):
  """transformers 4 layout (published SD text encoders): ``text_model.`` prefix and the
  ``position_ids`` buffer saved."""
  model.save_pretrained(d)
  path = os.path.join(d, "model.safetensors")
  state = {"text_model." + k: v.contiguous() for k, v in model.state_dict().items()}
  n = model.config.max_position_embeddings
  state["text_model.embeddings.position_ids"] = torch.arange(n)[None]
  safetensors_torch.save_file(state, path)


@pytest.fixture(scope="module")
def hf_text(tmp_path_factory):
  out = {}
  for name, kw in _TEXT.items():
    d = str(tmp_path_factory.mktemp(f"text_{name}"))
    model = _hf("CLIPTextModel", transformers.CLIPTextConfig(**kw))
    if name == "sd1":
      _save_legacy_text(model, d)
    else:
      model.save_pretrained(d)
    out[name] = (model, d)
  return out


def _token_ids(name, b=3, seed=0):
  """Rows of random tokens, an EOS at a per-row position, padding after it: SD 1.x pads
  with EOS (the largest id, found by argmax); SD 2.x pads with 0, and its rows hold ids
  larger than EOS, so argmax pooling would pick the wrong token."""
  kw = _TEXT[name]
  length, vocab = kw["max_position_embeddings"], kw["vocab_size"]
  rng = np.random.default_rng(seed)
  eos_pos = [length - 1, 4, 7][:b]
  if name == "sd1":
    ids = rng.integers(3, vocab - 1, (b, length))
    for i, p in enumerate(eos_pos):
      ids[i, p:] = vocab - 1
  else:
    ids = rng.integers(1, vocab, (b, length))
    ids[ids == kw["eos_token_id"]] = 5
    ids[:, 1] = vocab - 1  # larger than eos_token_id
    for i, p in enumerate(eos_pos):
      ids[i, p] = kw["eos_token_id"]
      ids[i, p + 1:] = 0
  ids[:, 0] = kw["bos_token_id"]
  return ids.astype(np.int32), eos_pos


# ----------------------------------------------------------------------------- HF text


@pytest.mark.parametrize("name", sorted(_TEXT))
def test_text_encoder_matches_transformers(hf_text, name):
  ref_model, d = hf_text[name]
  config, model, params = wclip.load_clip_text_encoder(d)
  assert config == mclip.CLIPTextConfig.from_hf(_TEXT[name])
  ids, eos_pos = _token_ids(name)
  with torch.no_grad():
    ref = ref_model(_t(ids).long(), output_hidden_states=True)
  out = run(model, params, ids)
  assert len(out["hidden_states"]) == len(ref.hidden_states) == config.num_hidden_layers + 1
  errs = dict(last=err(out["last_hidden_state"], ref.last_hidden_state),
              pooled=err(out["pooled"], ref.pooler_output),
              hidden=max(err(a, b) for a, b in zip(out["hidden_states"], ref.hidden_states)))
  print(name, errs)
  assert max(errs.values()) <= TOL, errs
  # the pooled token is the EOS one (not, for sd2, the largest id)
  np.testing.assert_array_equal(
      out["pooled"], out["last_hidden_state"][np.arange(len(ids)), eos_pos])

  # clip_skip: diffusers' final_layer_norm(hidden_states[-(k + 1)])
  skip = mclip.prompt_embeds(model, params, jnp.asarray(ids), clip_skip=1)
  with torch.no_grad():
    ref_skip = ref_model.final_layer_norm(ref.hidden_states[-2])
  assert err(skip, ref_skip) <= TOL
  np.testing.assert_allclose(mclip.prompt_embeds(model, params, jnp.asarray(ids)),
                             out["last_hidden_state"], atol=1e-5)  # eager vs jit


def test_text_encoder_attention_mask_and_short_input(hf_text):
  ref_model, d = hf_text["sd2"]
  _, model, params = wclip.load_clip_text_encoder(d)
  ids, eos_pos = _token_ids("sd2")
  mask = np.zeros_like(ids)
  for i, p in enumerate(eos_pos):
    mask[i, :p + 1] = 1
  with torch.no_grad():
    ref = ref_model(_t(ids).long(), attention_mask=_t(mask).long())
  out = run(model, params, ids, mask)
  assert err(out["last_hidden_state"], ref.last_hidden_state) <= TOL
  assert err(out["pooled"], ref.pooler_output) <= TOL
  # fewer tokens than max_position_embeddings
  short = ids[:, :8]
  with torch.no_grad():
    ref = ref_model(_t(short).long())
  assert err(run(model, params, short)["last_hidden_state"], ref.last_hidden_state) <= TOL


def test_text_encoder_subfolder_and_dtype(hf_text, tmp_path):
  _, d = hf_text["sd1"]
  shutil.copytree(d, tmp_path / "text_encoder")
  config, model, params = wclip.load_clip_text_encoder(
      str(tmp_path), subfolder="text_encoder", dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))
  ids, _ = _token_ids("sd1")
  ref = run(*wclip.load_clip_text_encoder(d)[1:], ids)["last_hidden_state"]
  out = run(model, params, ids)["last_hidden_state"]
  assert out.dtype == jnp.bfloat16 and 0 < err(out, ref) < 0.1


# ----------------------------------------------------------------------------- HF vision


@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
  out = {}
  for name, kw in _VISION.items():
    d = str(tmp_path_factory.mktemp(f"vision_{name}"))
    model = _hf("CLIPVisionModelWithProjection", transformers.CLIPVisionConfig(**kw))
    model.save_pretrained(d)
    out[name] = (model, d)
  return out


@pytest.mark.parametrize("name", sorted(_VISION))
def test_vision_with_projection_matches_transformers(hf_vision, name):
  ref_model, d = hf_vision[name]
  model, params = wclip.load_clip_vision(d)
  assert model.config == mclip.CLIPVisionConfig.from_hf(_VISION[name])
  images = _images(2, _VISION[name]["image_size"], seed=3)
  with torch.no_grad():
    ref = ref_model(pixel_values=_nchw(images))
  out = run(model, params, images)
  feats = run(model, params, images, method="image_features")
  errs = dict(embeds=err(out["image_embeds"], ref.image_embeds),
              features=err(feats, ref.image_embeds),
              last=err(out["last_hidden_state"], ref.last_hidden_state))
  print(name, errs)
  assert max(errs.values()) <= TOL, errs
  with pytest.raises(ValueError, match="NHWC"):
    run(model, params, _nchw(images).numpy())


# ----------------------------------------------------------------------------- CLIPModel


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("clip_model"))
  config = transformers.CLIPConfig(text_config=_TEXT["sd2"], vision_config=_VISION["b"],
                                   projection_dim=10)
  model = _hf("CLIPModel", config)
  model.save_pretrained(d)
  return model, d


def test_clip_model_matches_transformers(hf_clip):
  ref_model, d = hf_clip
  model, params = wclip.load_clip_model(d)
  ids, _ = _token_ids("sd2")
  images = _images(2, _VISION["b"]["image_size"], seed=4)
  with torch.no_grad():
    ref_img = ref_model.get_image_features(pixel_values=_nchw(images)).pooler_output
    ref_txt = ref_model.get_text_features(input_ids=_t(ids).long()).pooler_output
    ref_all = ref_model(input_ids=_t(ids).long(), pixel_values=_nchw(images))
  img = run(model, params, images, method="image_features")
  txt = run(model, params, ids, method="text_features")
  out = run(model, params, ids, images)
  assert img.shape == (2, 10) and txt.shape == (3, 10)
  errs = dict(image=err(img, ref_img), text=err(txt, ref_txt),
              logit_scale=err(params["logit_scale"], ref_model.logit_scale.detach()),
              logits=err(out["logits_per_image"], ref_all.logits_per_image))
  print(errs)
  assert params["logit_scale"].shape == ()
  assert max(errs.values()) <= TOL, errs

  # The vision tower + projection out of the full CLIPModel (aesthetic predictor's way).
  vmodel, vparams = wclip.load_clip_vision(d)
  assert vmodel.config.projection_dim == 10
  assert err(run(vmodel, vparams, images, method="image_features"), ref_img) <= TOL
  # The text tower out of the full CLIPModel.
  _, tmodel, tparams = wclip.load_clip_text_encoder(d)
  with torch.no_grad():
    ref_pooled = ref_model.text_model(input_ids=_t(ids).long()).pooler_output
  assert err(run(tmodel, tparams, ids)["pooled"], ref_pooled) <= TOL


# ----------------------------------------------------------------------------- open_clip

_OPEN_CLIP = {
    # ViT-H-14-like: gelu, defaults elsewhere.
    "h": dict(embed_dim=16,
              vision_cfg=dict(image_size=16, patch_size=4, width=32, head_width=8, layers=2),
              text_cfg=dict(context_length=12, vocab_size=64, width=32, heads=4, layers=2)),
    # quick_gelu, LayerScale, mlp_ratio, avg pooling with final LN after pool, text
    # projection with a bias, a non-default LayerNorm eps.
    "q": dict(embed_dim=8, quick_gelu=True,
              vision_cfg=dict(image_size=18, patch_size=6, width=24, head_width=12, layers=2,
                              mlp_ratio=2.0, ls_init_value=0.5, pool_type="avg",
                              final_ln_after_pool=True),
              text_cfg=dict(context_length=10, vocab_size=50, width=16, heads=2, layers=3,
                            ls_init_value=0.3, proj_bias=True, norm_kwargs=dict(eps=1e-6))),
}


def _open_clip_model(name):
  open_clip = import_open_clip()
  cfg = _OPEN_CLIP[name]
  torch.manual_seed(0)
  return _perturb(open_clip.CLIP(**cfg), seed=2)


@pytest.fixture(scope="module")
def open_clip_models(tmp_path_factory):
  d = tmp_path_factory.mktemp("open_clip")
  out = {}
  h = _open_clip_model("h")
  path = str(d / "h.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in h.state_dict().items()}, path)
  out["h"] = (h, path)
  q = _open_clip_model("q")
  path = str(d / "q_compressed.pt")  # HPSv2 style: pickled, wrapped, DDP-prefixed
  torch.save({"state_dict": {"module." + k: v for k, v in q.state_dict().items()}}, path)
  out["q"] = (q, path)
  return out


def _open_clip_text(name, b=3, seed=0):
  t = _OPEN_CLIP[name]["text_cfg"]
  ids = np.random.default_rng(seed).integers(1, t["vocab_size"] - 1,
                                             (b, t["context_length"]))
  for i, p in enumerate([t["context_length"] - 1, 3, 6][:b]):  # EOT = largest id, pad 0
    ids[i, p] = t["vocab_size"] - 1
    ids[i, p + 1:] = 0
  return ids.astype(np.int32)


@pytest.mark.parametrize("name", ["h", "q"])
def test_open_clip_matches_reference(open_clip_models, name):
  ref_model, path = open_clip_models[name]
  cfg = _OPEN_CLIP[name]
  model, params = wclip.load_open_clip(path, cfg, allow_pickle=path.endswith(".pt"))
  assert model.config == moc.OpenCLIPConfig.from_open_clip(cfg)
  images = _images(2, cfg["vision_cfg"]["image_size"], seed=5)
  ids = _open_clip_text(name)
  with torch.no_grad():
    ref_img = ref_model.encode_image(_nchw(images), normalize=False)
    ref_txt = ref_model.encode_text(_t(ids).long(), normalize=False)
    ref_logits = ref_model.get_logits(_nchw(images), _t(ids).long())[0]
  img = run(model, params, images, method="image_features")
  txt = run(model, params, ids, method="text_features")
  out = run(model, params, images, ids)
  errs = dict(image=err(img, ref_img), text=err(txt, ref_txt),
              logit_scale=err(params["logit_scale"], ref_model.logit_scale.detach()),
              logits=err(out["logits_per_image"], ref_logits))
  print(name, errs)
  assert max(errs.values()) <= TOL, errs


def test_open_clip_builtin_configs_match_open_clip():
  """ViT-H-14 (HPSv2) / ViT-L-14: our configs equal open_clip's JSON, and every tensor of
  open_clip's model (built on the meta device, nothing allocated) maps to one of our
  params with the right shape, and vice versa."""
  open_clip = import_open_clip()
  for name in ("ViT-H-14", "ViT-L-14"):
    cfg = open_clip.get_model_config(name)
    ours = moc.OpenCLIPConfig.named(name)
    assert ours == moc.OpenCLIPConfig.from_open_clip(cfg)
    with torch.device("meta"):
      ref = open_clip.CLIP(**cfg)
    state = {k: np.lib.stride_tricks.as_strided(np.zeros((), np.float32), tuple(v.shape),
                                                 [0] * v.dim())
             for k, v in ref.state_dict().items()}
    model = moc.OpenCLIPModel(ours)
    c = ours.vision
    expected = io.eval_shapes(lambda: model.init(  # noqa: B023
        jax.random.PRNGKey(0), jnp.zeros((1, c.image_size, c.image_size, 3), jnp.float32),
        jnp.zeros((1, 77), jnp.int32)))
    n = sum(int(np.prod(s)) for s in expected.values())
    assert n == sum(v.numel() for v in ref.parameters()), name
    mapped = {}
    for k, a in state.items():
      path, fn = wclip.torch_key_to_path(k, expected)
      shape = (fn(a) if fn is not None else a).shape
      assert shape == expected[path], (name, k, shape, expected[path])
      mapped[path] = k
      assert wclip.path_to_torch_key(path) == k
    assert set(mapped) == set(expected)
  h = moc.OPEN_CLIP_CONFIGS["ViT-H-14"]
  assert (h.embed_dim, h.vision.width, h.vision.layers, h.vision.heads, h.vision.patch_size,
          h.text.width, h.text.layers, h.text.heads, h.quick_gelu) == (
              1024, 1280, 32, 16, 14, 1024, 24, 16, False)


# ----------------------------------------------------------------------------- errors


def _copy_with_state(src, dst, edit):
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  state = load_file(path)
  edit(state)
  save_file(state, path)
  return str(dst)


def test_loader_errors(hf_text, hf_vision, open_clip_models, tmp_path):
  _, d = hf_text["sd2"]
  key = "encoder.layers.1.mlp.fc1.weight"
  bad = _copy_with_state(d, tmp_path / "missing", lambda s: s.pop(key))
  with pytest.raises(ValueError, match=r"missing key.*encoder\.layers\.1\.mlp\.fc1\.weight"):
    wclip.load_clip_text_encoder(bad)

  def reshape(s):
    s[key] = s[key][:, :-1].copy()
  bad = _copy_with_state(d, tmp_path / "shape", reshape)
  with pytest.raises(ValueError, match=r"wrong shape for encoder\.layers\.1\.mlp\.fc1\.weight"):
    wclip.load_clip_text_encoder(bad)

  def extra(s):
    s["encoder.layers.7.mlp.fc1.weight"] = s[key]
  bad = _copy_with_state(d, tmp_path / "extra", extra)
  with pytest.raises(ValueError, match=r"unexpected key.*encoder\.layers\.7"):
    wclip.load_clip_text_encoder(bad)

  # missing key in the legacy (text_model.-prefixed) layout names the prefixed key
  _, d1 = hf_text["sd1"]
  bad = _copy_with_state(d1, tmp_path / "missing_legacy",
                         lambda s: s.pop("text_model.final_layer_norm.bias"))
  with pytest.raises(ValueError, match=r"text_model\.final_layer_norm\.bias"):
    wclip.load_clip_text_encoder(bad)

  # pickle-only folder: refused without allow_pickle, loaded with it
  pk = tmp_path / "pickled"
  shutil.copytree(d, pk)
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  torch.save({k: torch.as_tensor(v) for k, v in
              load_file(str(pk / "model.safetensors")).items()}, pk / "pytorch_model.bin")
  os.remove(pk / "model.safetensors")
  with pytest.raises(ValueError, match="allow_pickle"):
    wclip.load_clip_text_encoder(str(pk))
  ids, _ = _token_ids("sd2")
  a = run(*wclip.load_clip_text_encoder(str(pk), allow_pickle=True)[1:], ids)
  b = run(*wclip.load_clip_text_encoder(d)[1:], ids)
  np.testing.assert_array_equal(a["last_hidden_state"], b["last_hidden_state"])

  # missing folder / subfolder: the error names the path and the files expected
  with pytest.raises(FileNotFoundError, match=r"no_such_dir.*config\.json"):
    wclip.load_clip_text_encoder(str(tmp_path / "no_such_dir"))
  with pytest.raises(FileNotFoundError, match=r"text_encoder.*config\.json"):
    wclip.load_clip_text_encoder(str(tmp_path), subfolder="text_encoder")
  with pytest.raises(FileNotFoundError, match=r"config\.json"):
    wclip.load_clip_model(d.replace("text_sd2", "nope"))

  # a vision folder given to the CLIPModel loader
  with pytest.raises(ValueError, match="text_config"):
    wclip.load_clip_model(hf_vision["a"][1])

  # unsupported config values name the key and the value
  cfg = json.load(open(os.path.join(d, "config.json")))
  bad = tmp_path / "act"
  shutil.copytree(d, bad)
  json.dump(dict(cfg, hidden_act="relu"), open(bad / "config.json", "w"))
  with pytest.raises(ValueError, match=r"hidden_act='relu'"):
    wclip.load_clip_text_encoder(str(bad))

  # open_clip: pickle refused without allow_pickle; a missing file; wrong architecture
  _, pt = open_clip_models["q"]
  with pytest.raises(ValueError, match="allow_pickle"):
    wclip.load_open_clip(pt, _OPEN_CLIP["q"])
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    wclip.load_open_clip(str(tmp_path / "nope.safetensors"))
  _, st = open_clip_models["h"]
  with pytest.raises(ValueError, match=r"missing key.*resblocks\.2"):
    cfg_h = dict(_OPEN_CLIP["h"], text_cfg=dict(_OPEN_CLIP["h"]["text_cfg"], layers=3))
    wclip.load_open_clip(st, cfg_h)
  with pytest.raises(ValueError, match=r"wrong shape for .*positional_embedding"):
    cfg_h = dict(_OPEN_CLIP["h"], text_cfg=dict(_OPEN_CLIP["h"]["text_cfg"],
                                                 context_length=13))
    wclip.load_open_clip(st, cfg_h)
  with pytest.raises(ValueError, match=r"attentional_pool=True"):
    moc.OpenCLIPConfig.from_open_clip(
        dict(_OPEN_CLIP["h"], vision_cfg=dict(_OPEN_CLIP["h"]["vision_cfg"],
                                              attentional_pool=True)))
  with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-X'"):
    wclip.load_open_clip(st, "ViT-X")
