"""DecoderLM (Llama / Qwen2 / Qwen3) and its HF loader against transformers on torch CPU.

Tiny random models are built with transformers, perturbed (so biases and norm weights are
not at their trivial init), saved as safetensors, loaded with ``load_lm`` and compared
logit by logit. Needs torch and transformers; skipped without them.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rft.models.lm import DecoderLM, LMConfig, forward, init_cache  # noqa: E402
from rft.weights import hf_lm  # noqa: E402
from rft.weights.hf_lm import load_lm, load_tokenizer, resolve_model_dir, save_lm  # noqa: E402

# Tests check semantics, not speed: skip XLA's backend optimisations.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_jit = functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST)
fwd = _jit(forward)

_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
# name -> (transformers config class name, kwargs). Together they cover: tied and untied
# embeddings; default, llama3, linear and dynamic RoPE; Llama q/k/v/o biases; Qwen2
# q/k/v biases; Qwen3 qk-norm with head_dim (32) != hidden / heads (16).
CONFIGS = {
    "llama_llama3": ("LlamaConfig", dict(
        rope_theta=10000.0, max_position_embeddings=256,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama_tied_dynamic": ("LlamaConfig", dict(
        tie_word_embeddings=True, max_position_embeddings=8,
        rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    "llama_linear_bias": ("LlamaConfig", dict(
        attention_bias=True, rope_theta=500.0,
        rope_scaling=dict(rope_type="linear", factor=4.0))),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
}
B, L = 2, 12


def _build_hf(name, directory):
  cls_name, kw = CONFIGS[name]
  hf_config = getattr(transformers, cls_name)(**_BASE, **kw)
  hf_config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():  # non-trivial norms and biases
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  model.save_pretrained(directory, safe_serialization=True)
  return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      d = str(tmp_path_factory.mktemp(name))
      cache[name] = (_build_hf(name, d), d)
    return cache[name]

  return get


def _hf_logits(model, tokens, mask=None, positions=None):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(tokens, np.int64)),
                attention_mask=None if mask is None else torch.as_tensor(
                    np.asarray(mask, np.int64)),
                position_ids=None if positions is None else torch.as_tensor(
                    np.asarray(positions, np.int64)))
  return out.logits.float().numpy()


def _tokens(b=B, l=L, seed=0):
  return np.random.default_rng(seed).integers(0, _BASE["vocab_size"], (b, l)).astype(np.int32)


def _ours(config, params, tokens, mask=None, positions=None):
  b, l = tokens.shape
  if mask is None:
    mask = np.ones((b, l), bool)
  if positions is None:
    positions = np.broadcast_to(np.arange(l, dtype=np.int32), (b, l))
  logits, cache = fwd(config, params, jnp.asarray(tokens), jnp.asarray(positions, jnp.int32),
                      jnp.asarray(mask, bool))
  assert cache is None
  return np.asarray(logits)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(hf_models, name):
  model, d = hf_models(name)
  config, params = load_lm(d)
  assert config.num_layers == 2 and config.num_kv_heads == 2
  assert config.tie_word_embeddings == ("lm_head" not in params)
  tokens = _tokens()
  ref = _hf_logits(model, tokens)
  ours = _ours(config, params, tokens)
  assert ours.dtype == np.float32 and ours.shape == (B, L, _BASE["vocab_size"])
  err = float(np.max(np.abs(ours - ref)))
  print(f"{name}: max abs logit error {err:.2e} (logit scale {np.abs(ref).max():.2f})")
  assert err <= 1e-4, (name, err)


def test_config_fields_per_family(hf_models):
  c = load_lm(hf_models("qwen3")[1])[0]
  assert (c.qk_norm, c.head_dim, c.attention_bias, c.model_type) == (True, 32, False, "qwen3")
  c = load_lm(hf_models("qwen2_tied")[1])[0]
  assert (c.attention_bias, c.o_proj_bias, c.tie_word_embeddings, c.rope_theta) == (
      True, False, True, 1e6)
  c = load_lm(hf_models("llama_llama3")[1])[0]
  assert c.rope_params == dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=64)
  c = load_lm(hf_models("llama_linear_bias")[1])[0]
  assert (c.attention_bias, c.o_proj_bias, c.model_type) == (True, True, "llama")


def _left_padded(b, l, pads, seed):
  tokens = _tokens(b, l, seed)
  mask = np.ones((b, l), bool)
  for i, p in enumerate(pads):
    mask[i, :p] = False
    tokens[i, :p] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def test_left_padded_batch_matches_transformers(hf_models):
  model, d = hf_models("qwen2_tied")
  config, params = load_lm(d)
  tokens, mask, positions = _left_padded(3, L, [0, 3, 7], seed=2)
  ref = _hf_logits(model, tokens, mask, positions)
  ours = _ours(config, params, tokens, mask, positions)
  assert np.all(np.isfinite(ours))  # fully masked pad queries give no NaN
  err = float(np.max(np.abs(ours - ref)[mask]))
  print(f"left-padded qwen2: max abs logit error {err:.2e}")
  assert err <= 1e-4
  # A left-padded row equals the same tokens unpadded (positions restart at 0).
  alone = _ours(config, params, tokens[2:, 7:])
  np.testing.assert_allclose(ours[2, 7:], alone[0], atol=1e-5)
  # Pads do not leak: changing pad tokens leaves real positions unchanged.
  tokens2 = tokens.copy()
  tokens2[~mask] = 5
  ours2 = _ours(config, params, tokens2, mask, positions)
  np.testing.assert_allclose(ours2[mask], ours[mask], atol=1e-6)


@pytest.mark.parametrize("name", ["llama_llama3", "qwen3"])
def test_cached_decode_equals_full_forward(hf_models, name):
  config, params = load_lm(hf_models(name)[1])
  prompt_len, total, max_len = 6, 11, 14
  tokens, mask, positions = _left_padded(2, total, [0, 2], seed=3)
  full = _ours(config, params, tokens, mask, positions)

  key_mask = np.zeros((2, max_len), bool)
  key_mask[:, :total] = mask  # slots past `total` are never written

  step = _jit(forward)
  cache = init_cache(config, 2, max_len)
  assert np.stack(cache["k"]).shape == (2, 2, 2, max_len, config.head_dim)
  logits, cache = step(config, params, jnp.asarray(tokens[:, :prompt_len]),
                       jnp.asarray(positions[:, :prompt_len]), jnp.asarray(key_mask), cache,
                       jnp.int32(0))
  errs = [np.max(np.abs(np.asarray(logits) - full[:, :prompt_len])[mask[:, :prompt_len]])]
  for t in range(prompt_len, total):
    logits, cache = step(config, params, jnp.asarray(tokens[:, t:t + 1]),
                         jnp.asarray(positions[:, t:t + 1]), jnp.asarray(key_mask), cache,
                         jnp.int32(t))
    errs.append(np.max(np.abs(np.asarray(logits)[:, 0] - full[:, t])))
  print(f"{name}: cached decode vs full forward, max abs error per step "
        f"{[f'{e:.1e}' for e in errs]}")
  assert max(errs) <= 1e-5, errs
  # The cache holds exactly the written slots; the rest stay zero.
  assert np.all(np.stack(cache["k"])[:, :, :, total:] == 0)
  assert np.any(np.stack(cache["k"])[:, :, :, total - 1] != 0)


def test_init_from_scratch_and_grads_finite():
  config = LMConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=1,
                    num_heads=4, num_kv_heads=1, qk_norm=True, attention_bias=True)
  tokens = jnp.zeros((2, 5), jnp.int32)
  positions = jnp.zeros((2, 5), jnp.int32)
  mask = jnp.zeros((2, 5), bool)  # every key masked: must stay finite
  params = DecoderLM(config).init(jax.random.PRNGKey(0), tokens, positions, mask)["params"]
  assert params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (32, 8)
  assert "bias" in params["layers_0"]["self_attn"]["o_proj"]

  def loss(p):
    return jnp.sum(forward(config, p, tokens, positions, mask)[0])

  g = jax.jit(jax.grad(loss), compiler_options=_FAST)(params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_load_round_trip(hf_models, name, tmp_path):
  model, d = hf_models(name)
  config, params = load_lm(d)
  out = save_lm(tmp_path / "export", config, params)
  config2, params2 = load_lm(out)
  assert config2 == config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, params2)
  # transformers reads the export as the same model.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager").eval()
  assert type(reloaded) is type(model)
  tokens = _tokens(1, 16, seed=4)
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens),
                             atol=1e-7)


def test_from_hf_spellings():
  base = dict(_BASE, model_type="llama")
  old = LMConfig.from_hf(dict(base, rope_theta=5e5, rope_scaling=dict(type="linear",
                                                                        factor=2.0)))
  new = LMConfig.from_hf(dict(base, rope_parameters=dict(rope_type="linear", factor=2.0,
                                                         rope_theta=5e5)))
  assert old == new and old.rope_params == {"rope_type": "linear", "factor": 2.0}
  assert old.rope_theta == 5e5
  plain = LMConfig.from_hf(dict(base, rope_scaling=None, rope_theta=1e4))
  assert plain.rope_scaling is None and plain.head_dim == 16
  # llama3 without original_max_position_embeddings: transformers' default.
  c = LMConfig.from_hf(dict(base, max_position_embeddings=99, rope_parameters=dict(
      rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)))
  assert c.rope_params["original_max_position_embeddings"] == 99
  with pytest.raises(ValueError, match="mistral"):
    LMConfig.from_hf(dict(base, model_type="mistral"))
  with pytest.raises(ValueError, match="sliding"):
    LMConfig.from_hf(dict(base, model_type="qwen2", use_sliding_window=True,
                          sliding_window=4, max_window_layers=1))
  with pytest.raises(ValueError, match="yarn"):
    LMConfig.from_hf(dict(base, rope_parameters=dict(rope_type="yarn", factor=2.0)))


# ----------------------------------------------------------------------------
# Loader errors and lookup
# ----------------------------------------------------------------------------


def _rewrite(src, dst, edit):
  from safetensors.numpy import load_file, save_file
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f:
    cfg = f.read()
  with open(os.path.join(dst, "config.json"), "w") as f:
    f.write(cfg)
  state = load_file(os.path.join(src, "model.safetensors"))
  edit(state)
  save_file(state, os.path.join(dst, "model.safetensors"))
  return dst


def test_load_errors(hf_models, tmp_path):
  _, d = hf_models("qwen3")
  missing = tmp_path / "does_not_exist"
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    load_lm(str(missing))

  bad = _rewrite(d, tmp_path / "missing_key",
                 lambda s: s.pop("model.layers.1.self_attn.k_norm.weight"))
  with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.self_attn\.k_norm"):
    load_lm(bad)

  def wrong_shape(s):
    s["model.layers.0.mlp.up_proj.weight"] = np.zeros((97, 64), np.float32)

  bad = _rewrite(d, tmp_path / "wrong_shape", wrong_shape)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*"
                                       r"\(97, 64\).*\(96, 64\)"):
    load_lm(bad)

  def extra(s):
    s["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored
    s["model.layers.5.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)

  bad = _rewrite(d, tmp_path / "extra", extra)
  with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.5\.mlp\.up_proj"):
    load_lm(bad)


def test_pickle_only_folder(hf_models, tmp_path):
  from safetensors.numpy import load_file
  _, d = hf_models("qwen2_tied")
  folder = tmp_path / "pickled"
  folder.mkdir()
  with open(os.path.join(d, "config.json")) as f:
    (folder / "config.json").write_text(f.read())
  state = load_file(os.path.join(d, "model.safetensors"))
  torch.save({k: torch.from_numpy(v) for k, v in state.items()},
             str(folder / "pytorch_model.bin"))
  with pytest.raises(ValueError, match="allow_pickle=True"):
    load_lm(folder)
  _, want = load_lm(d)
  _, got = load_lm(folder, allow_pickle=True)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               want, got)


def test_sharded_safetensors_and_tied_head_copy(hf_models, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, d = hf_models("qwen2_tied")
  state = load_file(os.path.join(d, "model.safetensors"))
  # A tied checkpoint that still stores lm_head.weight (== embedding) loads.
  state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
  folder = tmp_path / "sharded"
  folder.mkdir()
  (folder / "config.json").write_text(open(os.path.join(d, "config.json")).read())
  keys = sorted(state)
  shards = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  weight_map = {}
  for fname, ks in shards.items():
    save_file({k: state[k] for k in ks}, str(folder / fname))
    weight_map.update({k: fname for k in ks})
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": weight_map}))
  _, want = load_lm(d)
  _, got = load_lm(folder)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               want, got)
  # A different lm_head under tie_word_embeddings is an error, not silently dropped.
  state["lm_head.weight"] = state["lm_head.weight"] + 1
  save_file({k: state[k] for k in shards["model-00001-of-00002.safetensors"]
             if k in state}, str(folder / "model-00001-of-00002.safetensors"))
  save_file({k: state[k] for k in shards["model-00002-of-00002.safetensors"]},
            str(folder / "model-00002-of-00002.safetensors"))
  with pytest.raises(ValueError, match="lm_head.weight"):
    load_lm(folder)


def test_resolve_from_hub_cache(hf_models, tmp_path, monkeypatch):
  _, d = hf_models("qwen3")
  repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen3"
  snap = repo / "snapshots" / "0123abcd"
  snap.mkdir(parents=True)
  (repo / "snapshots" / "old").mkdir()
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0123abcd\n")
  for f in ("config.json", "model.safetensors"):
    os.symlink(os.path.join(d, f), snap / f)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  assert resolve_model_dir("tiny-org/tiny-qwen3") == str(snap)
  config, _ = load_lm("tiny-org/tiny-qwen3")
  assert config.qk_norm
  with pytest.raises(FileNotFoundError, match="models--tiny-org--absent.*config.json"):
    resolve_model_dir("tiny-org/absent")


def test_load_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                              unk_token="[UNK]")
  fast.save_pretrained(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert loaded("hello world foo")["input_ids"] == [2, 3, 1]
  assert hf_lm.resolve_model_dir(str(tmp_path)) == str(tmp_path)
