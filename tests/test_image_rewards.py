"""CLIP image preprocessing and the image rewards (aesthetic, PickScore, HPSv2, CLIPScore)
against the torch references.

Tiny random transformers CLIP models / open_clip CLIP models / torch aesthetic MLPs are built
on torch CPU, perturbed, saved as published checkpoints are (safetensors folders; HPSv2- and
LAION-style pickles) and scored by our rewards; the references compute the same formula on
torch. At the models' native size (no resize) the reference pixels come from the reference
preprocessing (CLIPImageProcessor / numpy normalisation) and the reference tokens from the
reference tokenizer (PickScore's processor call, ``open_clip.tokenize``): end to end. With a
resize, both sides get our preprocessed pixels. Max abs error <= 1e-4 in float32.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from rft.rewards import aesthetic as aes  # noqa: E402
from rft.rewards import base  # noqa: E402
from rft.rewards import clip_rewards as cr  # noqa: E402
from rft.rewards.preprocess import ImageTransform, preprocess  # noqa: E402
from tests.helpers import import_open_clip  # noqa: E402

TOL = 1e-4
SIZE = 32  # the tiny models' image size
TEXTS = ["a photo of a cat", "A Painting of an OLD  man, trending on ArtStation!!",
         "don’t “quote” &amp; me", " ".join(["word"] * 100), "it's a dog's life", "cat"]
IDS = np.array([0, 3, 1, 5], np.int32)
_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _u8(b, h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def _to_pm1(u8):
  return u8.astype(np.float32) / 127.5 - 1.0


def _nchw(x):
  return torch.as_tensor(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def _perturb(model, seed=1, scale=0.1):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return model.eval()


def _feat(out):
  """transformers 5 get_*_features return an output object; 4 a tensor."""
  return out if isinstance(out, torch.Tensor) else out.pooler_output


def _cos(a, b):
  a = a / a.norm(dim=-1, keepdim=True)
  b = b / b.norm(dim=-1, keepdim=True)
  return (a * b).sum(-1).numpy()


# ----------------------------------------------------------------------------- preprocess


def _smooth_u8(h, w, seed):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  img = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 0.4 + 0.5
  img = img + rng.normal(0, 0.05, img.shape)
  return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def _hf_pixels(proc, u8):
  return proc(images=list(u8), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


def test_preprocess_matches_clip_image_processor():
  """Exact without a resize. With one, PIL (bicubic on uint8: rounded and clipped between
  and after its two passes) and jax.image.resize (float, unclipped) differ by rounding.
  Measured over 6 seeds (normalised units; 1 uint8 level = 0.0145): on smooth images the
  mean error is 0.0041-0.0047 (PIL's output rounding) and the max 0.014-0.015 for the SD
  case 512 -> 224, up to 0.086 for the others where the image saturates and PIL clips
  overshoot; on white noise the mean is <= 0.0066. Bounds: mean <= 0.006 (noise 0.008),
  max <= 0.02 (512 -> 224) / 0.1."""
  proc = transformers.CLIPImageProcessor()
  for shape in [(224, 224), (260, 224)]:  # shortest side 224: crop only
    u8 = _u8(2, *shape, seed=1)
    ours = np.asarray(preprocess(_to_pm1(u8)))
    assert err(ours, _hf_pixels(proc, u8)) <= 1e-5, shape
  for i, shape in enumerate([(512, 512), (256, 320), (64, 64)]):
    u8 = _smooth_u8(*shape, seed=i)[None]
    d = np.abs(np.asarray(preprocess(_to_pm1(u8))) - _hf_pixels(proc, u8))
    assert d.mean() <= 0.006 and d.max() <= (0.02 if shape == (512, 512) else 0.1), (
        shape, d.max(), d.mean())
    noise = _u8(1, *shape, seed=i)
    d = np.abs(np.asarray(preprocess(_to_pm1(noise))) - _hf_pixels(proc, noise))
    assert d.mean() <= 0.008, (shape, d.mean())


def test_preprocessor_config(tmp_path):
  cfg = dict(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 32},
             image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=3)
  proc = transformers.CLIPImageProcessor(**cfg)
  proc.save_pretrained(str(tmp_path))
  t = ImageTransform.from_model_dir(str(tmp_path))
  assert (t.size, t.crop, t.mean, t.std) == (40, (36, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
  u8 = _u8(2, 40, 50, seed=2)  # shortest side already 40: crop + normalise only
  assert err(preprocess(_to_pm1(u8), t), _hf_pixels(proc, u8)) <= 1e-5
  assert ImageTransform.from_model_dir(str(tmp_path / "none")) == ImageTransform()
  assert ImageTransform.from_config({"size": 64, "crop_size": 64}).crop == (64, 64)
  with pytest.raises(ValueError, match=r"cfg.json: unsupported resample=0"):
    ImageTransform.from_config({"resample": 0}, source="cfg.json")
  with pytest.raises(ValueError, match=r"unsupported size=\{'height'"):
    ImageTransform.from_config({"size": {"height": 3, "width": 3}})
  with pytest.raises(ValueError, match=r"center crop \(36, 32\) is larger"):
    preprocess(jnp.zeros((1, 20, 20, 3)), ImageTransform(size=20, crop=(36, 32)))


# ----------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode():
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def _small_clip_tokenizer():
  """A CLIP BPE tokenizer with a tiny vocab: bytes, bytes + </w>, 3 merges, SOT/EOT."""
  chars = _bytes_to_unicode()
  merges = [("c", "a"), ("ca", "t</w>"), ("o", "f</w>")]
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


@pytest.fixture(scope="module")
def bpe_tokenizer_dir(tmp_path_factory):
  """vocab.json + merges.txt of open_clip's bpe_simple_vocab_16e6 (special tokens renamed
  as in OpenAI's HF tokenizer), the files of e.g. openai/clip-vit-large-patch14."""
  open_clip = import_open_clip()
  st = open_clip.tokenizer.SimpleTokenizer()
  rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
  d = tmp_path_factory.mktemp("bpe")
  with open(d / "vocab.json", "w") as f:
    json.dump({rename.get(k, k): v for k, v in st.encoder.items()}, f)
  merges = sorted(st.bpe_ranks, key=st.bpe_ranks.get)
  with open(d / "merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  return str(d)


def test_open_clip_tokens(bpe_tokenizer_dir):
  """Our HPSv2 token table equals open_clip.tokenize (cleaning, truncation keeping EOT)."""
  open_clip = import_open_clip()
  tok = cr.load_tokenizer(bpe_tokenizer_dir)
  ours = cr.open_clip_tokens(tok, TEXTS)
  ref = open_clip.tokenize(TEXTS).numpy()
  np.testing.assert_array_equal(ours, ref)
  assert ours[3, -1] == ours[0, 6] == cr.OPEN_CLIP_EOT and (ours[0, 7:] == 0).all()
  with pytest.raises(ValueError, match="expected the CLIP BPE tokenizer"):
    cr.open_clip_tokens(_small_clip_tokenizer(), TEXTS)


# ----------------------------------------------------------------------------- models


def _hf_clip(directory, *, tokenizer=True, processor=None, seed=0):
  """A tiny transformers CLIPModel (+ small tokenizer) saved as a published folder."""
  tok = _small_clip_tokenizer()
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                       num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id),
      vision_config=dict(image_size=SIZE, patch_size=8, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=4),
      projection_dim=16, logit_scale_init_value=2.0)
  torch.manual_seed(seed)
  model = _perturb(transformers.CLIPModel(cfg), seed=seed + 1)
  model.save_pretrained(directory, safe_serialization=True)
  if tokenizer:
    tok.save_pretrained(directory)
  if processor is not None:
    processor.save_pretrained(directory)
  return model, tok


class _TorchAestheticMLP(torch.nn.Module):
  """improved-aesthetic-predictor's MLP (Dropouts and all, as in its simple_inference.py)."""

  def __init__(self, d=768):
    super().__init__()
    self.layers = torch.nn.Sequential(
        torch.nn.Linear(d, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

  def forward(self, x):
    return self.layers(x)


_OPEN_CLIP_CFG = dict(embed_dim=16,
                      vision_cfg=dict(image_size=SIZE, patch_size=8, width=32, head_width=8,
                                      layers=1),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4,
                                    layers=1))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Tiny transformers CLIP folders (PickScore-, CLIPScore-style) and the aesthetic
  predictor (CLIP vision tower + torch MLP): no open_clip needed."""
  root = tmp_path_factory.mktemp("rewards")
  out = {}
  # PickScore: model folder with its tokenizer and a preprocessor config.
  proc = transformers.CLIPImageProcessor(size={"shortest_edge": SIZE},
                                         crop_size={"height": SIZE, "width": SIZE})
  out["pick"] = str(root / "pick")
  out["pick_model"], out["pick_tok"] = _hf_clip(out["pick"], processor=proc, seed=0)
  out["pick_proc"] = proc
  # CLIPScore: model folder without tokenizer (tokenizer_path given).
  out["cs"] = str(root / "cs")
  out["cs_tok"] = str(root / "cs_tok")
  out["cs_model"], tok = _hf_clip(out["cs"], tokenizer=False, seed=3)
  tok.save_pretrained(out["cs_tok"])
  # Aesthetic: CLIPVisionModelWithProjection (ViT-L/14's projection_dim 768) + torch MLP.
  vcfg = transformers.CLIPVisionConfig(image_size=SIZE, patch_size=8, hidden_size=32,
                                       intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=4, projection_dim=768)
  torch.manual_seed(5)
  out["vis_model"] = _perturb(transformers.CLIPVisionModelWithProjection(vcfg), seed=6)
  out["vis"] = str(root / "vis")
  out["vis_model"].save_pretrained(out["vis"], safe_serialization=True)
  torch.manual_seed(7)
  mlp = _perturb(_TorchAestheticMLP(), seed=8)
  out["mlp"] = mlp
  out["mlp_pth"] = str(root / "sac+logos+ava1-l14-linearMSE.pth")
  torch.save(mlp.state_dict(), out["mlp_pth"])  # keys layers.N.weight, as published
  out["mlp_st"] = str(root / "aesthetic_plain.safetensors")  # keys N.weight
  safetensors_torch.save_file(dict(mlp.layers.state_dict()), out["mlp_st"])
  return out


@pytest.fixture(scope="module")
def hps_models(tmp_path_factory, bpe_tokenizer_dir):
  """A tiny open_clip CLIP, pickled HPSv2-style and as safetensors, and the BPE tokenizer."""
  root = tmp_path_factory.mktemp("hps")
  out = {"tok": bpe_tokenizer_dir}
  open_clip = import_open_clip()
  torch.manual_seed(9)
  hps = _perturb(open_clip.CLIP(**_OPEN_CLIP_CFG), seed=10)
  out["hps_model"] = hps
  out["hps_pt"] = str(root / "HPS_v2_compressed.pt")
  torch.save({"state_dict": {"module." + k: v for k, v in hps.state_dict().items()}},
             out["hps_pt"])
  out["hps_st"] = str(root / "hps.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in hps.state_dict().items()},
                              out["hps_st"])
  return out


WEIGHTS = {"pickscore": 10.0, "hpsv2": 2.0, "aesthetic": 0.05}


@pytest.fixture(scope="module")
def rewards(models):
  """pickscore, clipscore and aesthetic, each built once (compiled once per input shape)."""
  m = models
  return {"pickscore": cr.pickscore_reward(model_path=m["pick"], prompt_texts=TEXTS),
          "clipscore": cr.clipscore_reward(model_path=m["cs"], tokenizer_path=m["cs_tok"],
                                           prompt_texts=TEXTS),
          "aesthetic": aes.aesthetic_reward(model_path=m["vis"], weights_file=m["mlp_st"])}


@pytest.fixture(scope="module")
def hps_rewards(hps_models):
  """hpsv2 from safetensors, hpsv2.1 from the HPSv2-style pickle."""
  m = hps_models
  return {"hpsv2": cr.hpsv2_reward(weights_file=m["hps_st"], model=_OPEN_CLIP_CFG,
                                   tokenizer_path=m["tok"], prompt_texts=TEXTS),
          "hpsv2.1": cr.hpsv21_reward(weights_file=m["hps_pt"], model=_OPEN_CLIP_CFG,
                                      tokenizer_path=m["tok"], prompt_texts=TEXTS,
                                      allow_pickle=True)}


def _native():  # images at the models' size: no resize, reference preprocessing end to end
  return _u8(len(IDS), SIZE, SIZE, seed=11)


def _resized():  # images that need a resize + crop: both sides get our pixels
  return jnp.asarray(_to_pm1(_u8(len(IDS), 40, 48, seed=12)))


def _our_pixels(x):
  return _nchw(preprocess(x, ImageTransform(size=SIZE, crop=(SIZE, SIZE))))


# ----------------------------------------------------------------------------- parity


def test_pickscore(models, rewards):
  m, reward = models, rewards["pickscore"]
  model, tok = m["pick_model"], m["pick_tok"]
  # PickScore's own inference: processor pixels, processor text (padding=True, truncation).
  u8 = _native()
  pix = torch.as_tensor(m["pick_proc"](images=list(u8), return_tensors="np")["pixel_values"])
  text = tok([TEXTS[i] for i in IDS], padding=True, truncation=True, max_length=16,
             return_tensors="pt")
  scale = model.logit_scale.exp().item()
  with torch.no_grad():
    t = _feat(model.get_text_features(**text))
    ref = scale * _cos(_feat(model.get_image_features(pixel_values=pix)), t)
    x = _resized()
    ref_resized = scale * _cos(_feat(model.get_image_features(pixel_values=_our_pixels(x))), t)
  assert err(reward(_to_pm1(u8), {"ids": IDS}), ref) <= TOL
  assert err(reward(x, {"ids": IDS}), ref_resized) <= TOL
  # The table: the tokenizer's ids padded with its pad id to max_position_embeddings.
  full = tok(TEXTS, padding="max_length", truncation=True, max_length=16)["input_ids"]
  np.testing.assert_array_equal(cr.prompt_table(tok, TEXTS, 16), np.array(full))


def test_clipscore(models, rewards):
  model = models["cs_model"]
  u8 = _native()
  pix = (u8.astype(np.float32) / 255.0 - _CLIP_MEAN) / _CLIP_STD  # default CLIP transform
  text = _small_clip_tokenizer()([TEXTS[i] for i in IDS], padding=True, truncation=True,
                                 max_length=16, return_tensors="pt")
  with torch.no_grad():
    cos = _cos(_feat(model.get_image_features(pixel_values=_nchw(pix))),
               _feat(model.get_text_features(**text)))
  assert (cos < 0).any() and (cos > 0).any()  # both branches of the max
  assert err(rewards["clipscore"](_to_pm1(u8), {"ids": IDS}), 2.5 * np.maximum(cos, 0.0)) <= TOL


def test_hpsv2(hps_models, hps_rewards):
  m, rewards = hps_models, hps_rewards
  open_clip = import_open_clip()
  hps = m["hps_model"]
  tokens = open_clip.tokenize([TEXTS[i] for i in IDS])
  u8 = _native()
  # open_clip's val transform at the native size: ToTensor + Normalize(OpenAI mean / std).
  pix = (u8.astype(np.float32) / 255.0 - _CLIP_MEAN) / _CLIP_STD
  x = _resized()
  with torch.no_grad():
    t = hps.encode_text(tokens)
    ref = _cos(hps.encode_image(_nchw(pix)), t)
    ref_resized = _cos(hps.encode_image(_our_pixels(x)), t)
  # hpsv2 from safetensors, hpsv2.1 (same formula, other weights) from the pickle.
  assert err(rewards["hpsv2"](_to_pm1(u8), {"ids": IDS}), ref) <= TOL
  assert err(rewards["hpsv2"](x, {"ids": IDS}), ref_resized) <= TOL
  assert rewards["hpsv2.1"].name == "hpsv2.1"
  assert err(rewards["hpsv2.1"](_to_pm1(u8), {"ids": IDS}), ref) <= TOL
  g = np.asarray(jax.grad(lambda x: rewards["hpsv2"](x, {"ids": IDS}).sum())(x))
  assert np.isfinite(g).all() and np.abs(g).max() > 0
  with pytest.raises(ValueError, match="allow_pickle=True"):
    cr.hpsv2_reward(weights_file=m["hps_pt"], model=_OPEN_CLIP_CFG, tokenizer_path=m["tok"],
                    prompt_texts=TEXTS)


def test_aesthetic(models, rewards):
  m = models
  vis, mlp = m["vis_model"], m["mlp"]
  # The head alone, from both key layouts (published pickle, plain-key safetensors).
  e = np.random.default_rng(16).normal(size=(5, 768)).astype(np.float32)
  with torch.no_grad():
    ref_head = mlp(torch.as_tensor(e))[:, 0].numpy()
  for path, pickle in [(m["mlp_pth"], True), (m["mlp_st"], False)]:
    params = aes.load_aesthetic_head(path, allow_pickle=pickle)
    assert err(aes.AestheticMLP().apply({"params": params}, e), ref_head) <= TOL, path
  # The reward end to end at the native size (CLIP processor at SIZE), and resized.
  u8 = _native()
  proc = transformers.CLIPImageProcessor(size={"shortest_edge": SIZE},
                                         crop_size={"height": SIZE, "width": SIZE})
  pix = torch.as_tensor(proc(images=list(u8), return_tensors="np")["pixel_values"])
  x = _resized()

  def ref(pix):
    with torch.no_grad():
      emb = vis(pixel_values=pix).image_embeds
      return mlp(emb / emb.norm(dim=-1, keepdim=True))[:, 0].numpy()

  assert err(rewards["aesthetic"](_to_pm1(u8), {}), ref(pix)) <= TOL
  assert err(rewards["aesthetic"](x, {}), ref(_our_pixels(x))) <= TOL


def test_gradients(rewards):
  """Differentiable end to end (resize, crop, towers): finite, nonzero image gradients."""
  x = _resized()
  prompts = {"ids": IDS}
  for name, r in rewards.items():
    assert r.differentiable and not r.host
    g = np.asarray(jax.grad(lambda x, r=r: r(x, prompts).sum())(x))
    assert np.isfinite(g).all() and np.abs(g).max() > 0, name
  # Jittable with traced ids.
  jitted = jax.jit(lambda x, ids: rewards["pickscore"](x, {"ids": ids}))
  assert err(jitted(x, jnp.asarray(IDS)), rewards["pickscore"](x, prompts)) <= TOL


def test_build(models, hps_models, rewards, hps_rewards):
  m, h = models, hps_models
  combined = base.build(
      ",".join(f"{k}:{w:g}" for k, w in WEIGHTS.items()), prompt_texts=TEXTS,
      options={"pickscore": {"model_path": m["pick"]},
               "hpsv2": {"weights_file": h["hps_st"], "model": _OPEN_CLIP_CFG,
                         "tokenizer_path": h["tok"]},
               "aesthetic": {"model_path": m["vis"], "weights_file": m["mlp_st"]}})
  assert combined.differentiable
  assert {r.name: w for w, r in combined.terms} == WEIGHTS
  x, prompts = _resized(), {"ids": IDS}
  single = dict(rewards, **hps_rewards)
  want = sum(w * np.asarray(single[n](x, prompts)) for n, w in WEIGHTS.items())
  assert err(combined(x, prompts), want) <= TOL
  assert sorted(combined.parts(x, prompts)) == sorted(WEIGHTS)
  # A pickle refused through the config names the key the user types.
  with pytest.raises(ValueError, match=r"pass --config\.reward_options\.aesthetic\."
                                       r"allow_pickle=True to load it"):
    base.build("aesthetic", options={"aesthetic": {"model_path": m["vis"],
                                                   "weights_file": m["mlp_pth"]}})


# ----------------------------------------------------------------------------- errors


def test_errors(models, rewards, tmp_path):
  m = models
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError,
                     match=r"config.reward_options.pickscore.model_path=.*nowhere.*PickScore_v1"):
    cr.pickscore_reward(model_path=missing, prompt_texts=TEXTS)
  with pytest.raises(FileNotFoundError, match=r"hpsv2.weights_file is not set.*xswu/HPSv2"):
    cr.hpsv2_reward(prompt_texts=TEXTS)
  with pytest.raises(FileNotFoundError, match=r"aesthetic.weights_file=.*no such file"):
    aes.aesthetic_reward(model_path=m["vis"], weights_file=missing)
  with pytest.raises(FileNotFoundError, match=r"no tokenizer files.*clipscore.tokenizer_path"):
    cr.clipscore_reward(model_path=m["cs"], prompt_texts=TEXTS)
  with pytest.raises(ValueError, match="needs prompt_texts"):
    cr.pickscore_reward(model_path=m["pick"])
  with pytest.raises(ValueError, match=r"allow_pickle=True"):
    aes.aesthetic_reward(model_path=m["vis"], weights_file=m["mlp_pth"])
  reward = rewards["pickscore"]
  x = _to_pm1(_native())
  with pytest.raises(ValueError, match=r"prompt ids must be in \[0, 6\)"):
    reward(x, {"ids": np.array([0, 6])})
  with pytest.raises(KeyError, match=r"needs prompts\['ids'\]"):
    reward(x, {})
  # Head checkpoints: a missing key, a wrong shape.
  sd = {k: v.numpy() for k, v in m["mlp"].state_dict().items()}
  bad = str(tmp_path / "missing.safetensors")
  safetensors_numpy.save_file({k: v for k, v in sd.items() if k != "layers.7.bias"}, bad)
  with pytest.raises(ValueError, match=r"missing key.*layers.7.bias"):
    aes.load_aesthetic_head(bad)
  sd["layers.2.weight"] = np.zeros((128, 1000), np.float32)
  safetensors_numpy.save_file(sd, bad)
  with pytest.raises(ValueError, match=r"wrong shape for layers.2.weight.*\(128, 1000\)"):
    aes.load_aesthetic_head(bad)
  sd = {k: v.numpy() for k, v in m["mlp"].state_dict().items()}
  sd["layers.9.weight"] = np.zeros((1, 1), np.float32)
  safetensors_numpy.save_file(sd, bad)
  with pytest.raises(ValueError, match=r"unexpected key.*layers.9.weight"):
    aes.load_aesthetic_head(bad)
