"""SD3's text side (rft.weights.sd3_text) against diffusers' StableDiffusion3Pipeline.

A tiny random SD3 pipeline (``tests.sd_fixtures.tiny_sd3_folder``: two CLIP text towers
with projection, a gated-gelu T5, offline tokenizers) is saved the way the hub serves it
and loaded both by diffusers and by :func:`load_sd3_text`; token ids must be identical,
``prompt_embeds`` / ``pooled_prompt_embeds`` (prompt and the empty negative prompt,
``clip_skip``, separate ``prompt_2`` / ``prompt_3``, no T5) within 1e-4 in float32.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from rft.models import clip as mclip  # noqa: E402
from rft.weights import clip as wclip  # noqa: E402
from rft.weights import sd3_text  # noqa: E402
from tests.sd_fixtures import tiny_sd3_folder  # noqa: E402

TOL = 1e-4
MAX_SEQ = 20  # T5 tokens; the CLIP tokenizers' model_max_length is 16
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the grass, oil painting", ""]


def err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tiny_sd3_folder(str(tmp_path_factory.mktemp("sd3")))


@pytest.fixture(scope="module")
def pipe(folder):
  return diffusers.StableDiffusion3Pipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def text(folder):
  return sd3_text.load_sd3_text(folder)


def _encode_ref(pipe, prompt, **kw):
  with torch.no_grad():
    pe, npe, pp, npp = pipe.encode_prompt(prompt, None, None, device="cpu",
                                          max_sequence_length=MAX_SEQ, **kw)
  to_np = lambda x: None if x is None else x.numpy()  # noqa: E731
  return to_np(pe), to_np(npe), to_np(pp), to_np(npp)


def test_clip_with_projection_matches_transformers(folder, pipe):
  for sub, ref_model in [("text_encoder", pipe.text_encoder),
                         ("text_encoder_2", pipe.text_encoder_2)]:
    config, model, params = wclip.load_clip_text_with_projection(folder, subfolder=sub)
    assert isinstance(model, mclip.CLIPTextModelWithProjection)
    assert config.projection_dim == ref_model.config.projection_dim
    tok = pipe.tokenizer if sub == "text_encoder" else pipe.tokenizer_2
    ids = tok(PROMPTS, padding="max_length", max_length=16, truncation=True,
              return_tensors="np")["input_ids"]
    with torch.no_grad():
      ref = ref_model(torch.as_tensor(ids), output_hidden_states=True)
    out = model.apply({"params": params}, jnp.asarray(ids))
    errs = dict(text_embeds=err(out["text_embeds"], ref.text_embeds),
                last=err(out["last_hidden_state"], ref.last_hidden_state),
                hidden=max(err(a, b) for a, b in zip(out["hidden_states"],
                                                     ref.hidden_states)))
    print(sub, errs)
    assert max(errs.values()) <= TOL, errs
    skip = mclip.prompt_embeds(model, params, jnp.asarray(ids), clip_skip=1)
    with torch.no_grad():
      ref_skip = ref_model.text_model.final_layer_norm(ref.hidden_states[-2])
    assert err(skip, ref_skip) <= TOL


def test_tokenize_matches_pipeline(pipe, text):
  tokens = text.tokenize(PROMPTS, MAX_SEQ)
  assert set(tokens) == {"clip_l", "clip_g", "t5"}
  assert tokens["clip_l"].shape == tokens["clip_g"].shape == (3, 16)
  assert tokens["t5"].shape == (3, MAX_SEQ) and tokens["t5"].dtype == np.int32
  n = pipe.tokenizer_max_length
  for key, tok, length in [("clip_l", pipe.tokenizer, n), ("clip_g", pipe.tokenizer_2, n),
                           ("t5", pipe.tokenizer_3, MAX_SEQ)]:
    ref = tok(PROMPTS, padding="max_length", max_length=length, truncation=True,
              add_special_tokens=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(tokens[key], ref)
  # the two CLIP tokenizers pad differently (CLIP-G-like pads with "!" = id 0)
  assert (tokens["clip_g"] == 0).any() and not (tokens["clip_l"] == 0).any()


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_encode_prompt_matches_diffusers(pipe, text, clip_skip):
  pe, npe, pp, npp = _encode_ref(pipe, PROMPTS, do_classifier_free_guidance=True,
                                 clip_skip=clip_skip)
  embeds, pooled = text.encode(PROMPTS, MAX_SEQ, clip_skip=clip_skip)
  neg, neg_pooled = text.encode([""] * len(PROMPTS), MAX_SEQ)  # diffusers: no clip_skip
  assert embeds.shape == (3, 16 + MAX_SEQ, 48) and pooled.shape == (3, 12 + 20)
  assert embeds.dtype == pooled.dtype == jnp.float32
  errs = dict(embeds=err(embeds, pe), pooled=err(pooled, pp), neg=err(neg, npe),
              neg_pooled=err(neg_pooled, npp), clip_part=err(embeds[:, :16], pe[:, :16]))
  print(clip_skip, errs)
  assert max(errs.values()) <= TOL, errs
  # layout: CLIP-L | CLIP-G | zeros on channels for the first 16 tokens, then T5
  assert np.all(np.asarray(embeds)[:, :16, 16 + 24:] == 0)
  assert np.abs(np.asarray(embeds)[:, 16:, 40:]).max() > 0.1
  if clip_skip:  # clip_skip changes the CLIP part only
    base, _ = text.encode(PROMPTS, MAX_SEQ)
    assert err(base[:, :16], embeds[:, :16]) > 1e-2
    np.testing.assert_allclose(base[:, 16:], embeds[:, 16:], atol=1e-6)


def test_separate_prompts_and_jit(pipe, text):
  p1, p2, p3 = ["a red dog"], ["the lazy fox"], ["a mountain lake at night"]
  with torch.no_grad():
    pe, _, pp, _ = pipe.encode_prompt(p1, p2, p3, device="cpu", max_sequence_length=MAX_SEQ,
                                      do_classifier_free_guidance=False)
  tokens = sd3_text.tokenize_sd3(text.tokenizers, p1, MAX_SEQ, texts_2=p2, texts_3=p3)
  fn = jax.jit(lambda p, t: sd3_text.encode_sd3_prompt(text.encoders, p, t))
  embeds, pooled = fn(text.params, tokens)
  assert err(embeds, pe.numpy()) <= TOL and err(pooled, pp.numpy()) <= TOL


def test_without_t5_matches_diffusers(folder, text):
  pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(
      folder, text_encoder_3=None, tokenizer_3=None)
  pe, _, pp, _ = _encode_ref(pipe, PROMPTS[:2], do_classifier_free_guidance=False)
  no_t5 = sd3_text.load_sd3_text(folder, load_t5=False)
  assert no_t5.encoders.t5 is None and no_t5.tokenizers[2] is None
  assert "text_encoder_3" not in no_t5.params
  embeds, pooled = no_t5.encode(PROMPTS[:2], MAX_SEQ)
  assert err(embeds, pe) <= TOL and err(pooled, pp) <= TOL
  assert np.all(np.asarray(embeds)[:, 16:] == 0)
  # a folder saved without T5 (model_index says null) loads the same way
  d = os.path.join(os.path.dirname(folder), "no_t5")
  shutil.copytree(folder, d)
  shutil.rmtree(os.path.join(d, "text_encoder_3"))
  shutil.rmtree(os.path.join(d, "tokenizer_3"))
  index = json.load(open(os.path.join(d, "model_index.json")))
  index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
  json.dump(index, open(os.path.join(d, "model_index.json"), "w"))
  loaded = sd3_text.load_sd3_text(d)
  assert loaded.encoders.t5 is None and loaded.encoders.joint_attention_dim == 48
  np.testing.assert_allclose(loaded.encode(PROMPTS[:2], MAX_SEQ)[0], embeds, atol=1e-6)


def test_fp16_variant_beside_is_ignored(folder, text, tmp_path):
  """Hub SD3 folders hold model.fp16.safetensors next to model.safetensors."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  d = tmp_path / "variants"
  shutil.copytree(folder, d)
  for sub in ("text_encoder", "text_encoder_2", "text_encoder_3"):
    state = load_file(str(d / sub / "model.safetensors"))
    save_file({k: (v + 1).astype(np.float16) if v.dtype.kind == "f" else v
               for k, v in state.items()}, str(d / sub / "model.fp16.safetensors"))
  loaded = sd3_text.load_sd3_text(str(d))
  for a, b in zip(jax.tree_util.tree_leaves(loaded.params),
                  jax.tree_util.tree_leaves(text.params)):
    np.testing.assert_array_equal(a, b)


def _index_only(folder, dst, edit):
  os.makedirs(dst)
  index = json.load(open(os.path.join(folder, "model_index.json")))
  edit(index)
  json.dump(index, open(os.path.join(dst, "model_index.json"), "w"))
  for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
               "tokenizer_3"):
    os.makedirs(os.path.join(dst, name), exist_ok=True)
  return str(dst)


def test_errors(folder, text, tmp_path):
  bad = _index_only(folder, tmp_path / "no_clip_g", lambda i: i.pop("text_encoder_2"))
  with pytest.raises(ValueError, match=r"no 'text_encoder_2' component"):
    sd3_text.load_sd3_text(bad)
  bad = _index_only(folder, tmp_path / "null_tok", lambda i: i.update(tokenizer=[None, None]))
  with pytest.raises(ValueError, match=r"'tokenizer' is null"):
    sd3_text.load_sd3_text(bad)
  bad = _index_only(folder, tmp_path / "half_t5",
                    lambda i: i.update(text_encoder_3=[None, None]))
  with pytest.raises(ValueError, match=r"text_encoder_3 / tokenizer_3"):
    sd3_text.load_sd3_text(bad)
  bad = _index_only(folder, tmp_path / "wrong_class",
                    lambda i: i.update(text_encoder=["transformers", "CLIPTextModel"]))
  with pytest.raises(ValueError, match=r"text_encoder is a CLIPTextModel"):
    sd3_text.load_sd3_text(bad)
  # listed but absent on disk
  d = tmp_path / "no_dir"
  shutil.copytree(folder, d)
  shutil.rmtree(d / "tokenizer_3")
  with pytest.raises(FileNotFoundError, match=r"missing component 'tokenizer_3'"):
    sd3_text.load_sd3_text(str(d))
  with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
    sd3_text.load_sd3_text(str(tmp_path / "nothing_here"))
  # tokens of different CLIP lengths; clip_skip past the first layer
  tokens = text.tokenize(["a cat"], MAX_SEQ)
  with pytest.raises(ValueError, match="same"):
    sd3_text.encode_sd3_prompt(text.encoders, text.params,
                               dict(tokens, clip_g=tokens["clip_g"][:, :8]))
  with pytest.raises(ValueError, match="clip_skip=3"):
    sd3_text.encode_sd3_prompt(text.encoders, text.params, tokens, clip_skip=3)
