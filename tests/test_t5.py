"""T5 encoder (rft.models.t5) and its loader (rft.weights.t5) against transformers.

Tiny random ``transformers.T5EncoderModel`` s are built on torch CPU, perturbed (so the
RMS-norm weights are not at their trivial init), saved with ``save_pretrained``, loaded
with :func:`rft.weights.t5.load_t5_encoder` and run on the same ids, with and without a
padding mask: max abs error <= 1e-4 in float32. Sequences are longer than
``relative_attention_max_distance`` so every kind of relative-position bucket is used.
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

from rft.models import t5 as mt5  # noqa: E402
from rft.weights import t5 as wt5  # noqa: E402

_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = 1e-4

_CONFIGS = {
    # T5 v1.0 (t5-small-like): relu, d_kv * heads == d_model.
    "v1_0": dict(vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=12,
                 feed_forward_proj="relu"),
    # T5 v1.1 / T5-XXL-like (SD3): gated-gelu (gelu_new), d_kv * heads != d_model.
    "v1_1": dict(vocab_size=70, d_model=40, d_kv=6, d_ff=56, num_layers=2, num_heads=3,
                 relative_attention_num_buckets=16, relative_attention_max_distance=20,
                 feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-5),
}
_LENGTH = 29


@functools.lru_cache(maxsize=None)
def _jitted(model):
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a), compiler_options=_FAST)


def run(model, params, *args):
  return np.asarray(_jitted(model)(params, *[jnp.asarray(a) for a in args]))


def err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _hf_model(kw, cls="T5EncoderModel", seed=0):
  config = transformers.T5Config(dropout_rate=0.0, **kw)
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(seed)
  model = getattr(transformers, cls)(config)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model.eval()


def _ids_and_mask(vocab, b=3, length=_LENGTH, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, vocab, (b, length))
  mask = np.ones((b, length), np.int64)
  for i, n in enumerate([length, 11, 1][:b]):  # full, padded, one real token
    mask[i, n:] = 0
    ids[i, n:] = 0
  return ids, mask


@pytest.fixture(scope="module")
def hf_t5(tmp_path_factory):
  out = {}
  for name, kw in _CONFIGS.items():
    d = str(tmp_path_factory.mktemp(f"t5_{name}"))
    model = _hf_model(kw)
    model.save_pretrained(d)
    out[name] = (model, d)
  return out


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_t5_encoder_matches_transformers(hf_t5, name):
  ref_model, d = hf_t5[name]
  config, model, params = wt5.load_t5_encoder(d)
  assert config == mt5.T5Config(**_CONFIGS[name])
  assert config.is_gated_act == (name == "v1_1")
  n_params = sum(int(np.prod(np.shape(v))) for v in jax.tree_util.tree_leaves(params))
  assert n_params == mt5.param_count(config) == sum(
      p.numel() for p in ref_model.parameters())
  ids, mask = _ids_and_mask(config.vocab_size)
  with torch.no_grad():
    ref_masked = ref_model(input_ids=torch.as_tensor(ids),
                           attention_mask=torch.as_tensor(mask)).last_hidden_state
    ref_plain = ref_model(input_ids=torch.as_tensor(ids)).last_hidden_state
  out_masked = run(model, params, ids, mask)
  out_plain = run(model, params, ids)
  assert out_masked.dtype == np.float32 and out_masked.shape == (3, _LENGTH, config.d_model)
  errs = dict(masked=err(out_masked, ref_masked), plain=err(out_plain, ref_plain))
  print(name, errs)
  assert max(errs.values()) <= TOL, errs
  assert err(out_masked, out_plain) > 1e-2  # the mask matters
  # short input (fewer positions than the largest bucket distance)
  with torch.no_grad():
    ref = ref_model(input_ids=torch.as_tensor(ids[:, :5])).last_hidden_state
  assert err(run(model, params, ids[:, :5]), ref) <= TOL


def test_relative_position_bucket_matches_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket  # pylint: disable=protected-access
  rel = np.arange(-300, 301)
  for num_buckets, max_distance in [(32, 128), (8, 12), (16, 20), (6, 7)]:
    ref = bucket(torch.as_tensor(rel), bidirectional=True, num_buckets=num_buckets,
                 max_distance=max_distance).numpy()
    out = np.asarray(mt5.relative_position_bucket(rel, num_buckets, max_distance))
    np.testing.assert_array_equal(out, ref)
    assert out.min() == 0 and out.max() == num_buckets - 1


def test_t5_bf16_compute(hf_t5):
  ref_model, d = hf_t5["v1_1"]
  _, model, params = wt5.load_t5_encoder(d, dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))
  ids, _ = _ids_and_mask(_CONFIGS["v1_1"]["vocab_size"])
  with torch.no_grad():
    ref = ref_model(input_ids=torch.as_tensor(ids)).last_hidden_state
  out = run(model, params, ids)
  assert out.dtype == np.float32 and 0 < err(out, ref) < 0.1


def test_full_t5_sharded_legacy_and_subfolder(hf_t5, tmp_path):
  """A T5ForConditionalGeneration folder (decoder + lm_head dropped), sharded; the legacy
  layout with only ``encoder.embed_tokens.weight``; a subfolder."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  kw = _CONFIGS["v1_1"]
  full = _hf_model(kw, cls="T5ForConditionalGeneration", seed=3)
  d = str(tmp_path / "full")
  full.save_pretrained(d, max_shard_size="20KB")
  assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
  _, model, params = wt5.load_t5_encoder(d)
  ids, mask = _ids_and_mask(kw["vocab_size"], seed=1)
  with torch.no_grad():
    ref = full.encoder(input_ids=torch.as_tensor(ids),
                       attention_mask=torch.as_tensor(mask)).last_hidden_state
  assert err(run(model, params, ids, mask), ref) <= TOL

  # transformers 4 layout: the tied table as encoder.embed_tokens.weight only, or both
  ref_model, src = hf_t5["v1_1"]
  want = run(*wt5.load_t5_encoder(src)[1:], ids)
  state = load_file(os.path.join(src, "model.safetensors"))
  table = state.pop("shared.weight", None)
  if table is None:
    table = state.pop("encoder.embed_tokens.weight")
  for name, extra in [("embed_only", {"encoder.embed_tokens.weight": table}),
                      ("both", {"encoder.embed_tokens.weight": table, "shared.weight": table})]:
    dst = tmp_path / name / "text_encoder_3"
    shutil.copytree(src, dst)
    save_file(dict(state, **extra), str(dst / "model.safetensors"))
    _, m, p = wt5.load_t5_encoder(str(tmp_path / name), subfolder="text_encoder_3")
    np.testing.assert_array_equal(run(m, p, ids), want)
  del ref_model


def _copy_with_state(src, dst, edit):
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  state = load_file(path)
  edit(state)
  save_file(state, path)
  return str(dst)


def test_loader_and_config_errors(hf_t5, tmp_path):
  _, d = hf_t5["v1_1"]
  key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
  bad = _copy_with_state(d, tmp_path / "missing", lambda s: s.pop(key))
  with pytest.raises(ValueError, match=r"missing key.*encoder\.block\.1\.layer\.1\."
                                       r"DenseReluDense\.wi_1\.weight"):
    wt5.load_t5_encoder(bad)

  def reshape(s):
    s[key] = s[key][:, :-1].copy()
  bad = _copy_with_state(d, tmp_path / "shape", reshape)
  with pytest.raises(ValueError, match=r"wrong shape for encoder\.block\.1\.layer\.1\."
                                       r"DenseReluDense\.wi_1\.weight"):
    wt5.load_t5_encoder(bad)

  def extra(s):
    s["encoder.block.5.layer.0.SelfAttention.q.weight"] = s[key]
  bad = _copy_with_state(d, tmp_path / "extra", extra)
  with pytest.raises(ValueError, match=r"unexpected key.*encoder\.block\.5"):
    wt5.load_t5_encoder(bad)

  def untie(s):
    table = s.get("shared.weight", s.get("encoder.embed_tokens.weight"))
    s["shared.weight"] = table
    s["encoder.embed_tokens.weight"] = table + 1
  bad = _copy_with_state(d, tmp_path / "untied", untie)
  with pytest.raises(ValueError, match=r"encoder\.embed_tokens\.weight differs"):
    wt5.load_t5_encoder(bad)

  # no embedding table at all: named as shared.weight
  def drop_table(s):
    s.pop("shared.weight", None)
    s.pop("encoder.embed_tokens.weight", None)
  bad = _copy_with_state(d, tmp_path / "no_table", drop_table)
  with pytest.raises(ValueError, match=r"missing key.*shared\.weight"):
    wt5.load_t5_encoder(bad)

  # unsupported config keys / values are named (with the file)
  cfg = json.load(open(os.path.join(d, "config.json")))
  for i, (edit, pattern) in enumerate([
      (dict(feed_forward_proj="gated-tanh"), r"config\.json.*feed_forward_proj='gated-tanh'"),
      (dict(model_type="umt5"), r"model_type='umt5'"),
      (dict(is_decoder=True), r"is_decoder"),
      (dict(dense_act_fn="gelu"), r"dense_act_fn='gelu'"),
  ]):
    bad = tmp_path / f"cfg{i}"
    shutil.copytree(d, bad)
    json.dump(dict(cfg, **edit), open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match=pattern):
      wt5.load_t5_encoder(str(bad))
  with pytest.raises(ValueError, match=r"feed_forward_proj='swiglu'"):
    mt5.T5Config(feed_forward_proj="swiglu")
  # transformers-4 configs carry the derived keys: consistent ones are fine
  assert mt5.T5Config.from_transformers(
      dict(cfg, dense_act_fn="gelu_new", is_gated_act=True)).dense_act_fn == "gelu_new"

  # pickle-only folder: refused without allow_pickle
  pk = tmp_path / "pickled"
  shutil.copytree(d, pk)
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  torch.save({k: torch.as_tensor(v) for k, v in
              load_file(str(pk / "model.safetensors")).items()}, pk / "pytorch_model.bin")
  os.remove(pk / "model.safetensors")
  with pytest.raises(ValueError, match="allow_pickle"):
    wt5.load_t5_encoder(str(pk))
  assert wt5.load_t5_encoder(str(pk), allow_pickle=True)[0].d_model == 40

  with pytest.raises(FileNotFoundError, match=r"no_such_dir.*config\.json"):
    wt5.load_t5_encoder(str(tmp_path / "no_such_dir"))
  with pytest.raises(FileNotFoundError, match=r"text_encoder_3.*config\.json"):
    wt5.load_t5_encoder(str(tmp_path), subfolder="text_encoder_3")
