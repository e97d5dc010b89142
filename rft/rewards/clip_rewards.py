"""Differentiable CLIP-based image-text rewards: PickScore, HPSv2 / HPSv2.1, CLIPScore.

With e_i = image embedding, e_t = text embedding (projected) and
cos = <e_i, e_t> / (|e_i| |e_t|):

* ``pickscore`` (Kirstain et al. 2023): exp(logit_scale) * cos, a transformers CLIPModel
  (``yuvalkirstain/PickScore_v1``, OpenCLIP-H in HF format) and its CLIP tokenizer.
* ``hpsv2`` / ``hpsv2.1`` (Wu et al. 2023): cos of an open_clip ViT-H-14 finetuned on
  HPDv2 (HPSv2's ``score``: normalised features, ``image @ text.T``, no scale).
* ``clipscore`` (Hessel et al. 2021): 2.5 * max(cos, 0) with a transformers CLIPModel
  (the paper's is OpenAI ViT-B/32).
* ``aesthetic`` (rft.rewards.aesthetic): the LAION improved aesthetic predictor.

Images [B, H, W, 3] in [-1, 1] are preprocessed in JAX (rft.rewards.preprocess: resize
shortest side, center crop, CLIP mean/std), so every reward is differentiable w.r.t. the
images. Prompts are tokenised once on the host at build time: ``prompt_texts`` (every prompt
of the run, ``config.prompt_set``) becomes a table [N, context_length] int32, and the
reward looks rows up with ``prompts["ids"]``; the text tower runs inside the reward.
PickScore / CLIPScore pad with the tokenizer's pad id (after EOS, which the causal text
tower makes irrelevant); HPSv2 uses open_clip's format: SOT 49406, BPE ids, EOT 49407,
zeros, truncated to 77 keeping EOT (made with a transformers CLIPTokenizer of the same
BPE, after open_clip's ftfy / html-unescape cleaning).

Factory options (``config.reward_options.<name>.<key>``; folders may be hub ids: the HF
cache's copy, else downloaded, rft.weights.io.resolve_model_dir):

  pickscore:  model_path ("yuvalkirstain/PickScore_v1"), tokenizer_path (default: the
              model folder if it has tokenizer files; PickScore's own is
              "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"), allow_pickle, dtype
  hpsv2:      weights_file (HPS_v2_compressed.pt from https://huggingface.co/xswu/HPSv2,
              a pickle: allow_pickle=True, or converted to .safetensors), model
              ("ViT-H-14", an open_clip model_config dict or OpenCLIPConfig),
              tokenizer_path (a CLIP BPE tokenizer folder: "openai/clip-vit-large-patch14"
              or an SD pipeline's tokenizer/), allow_pickle, dtype
  hpsv2.1:    the same with HPS_v2.1_compressed.pt
  clipscore:  model_path ("openai/clip-vit-base-patch32"), tokenizer_path, allow_pickle, dtype
  aesthetic:  model_path ("openai/clip-vit-large-patch14"), weights_file
              (sac+logos+ava1-l14-linearMSE.pth), allow_pickle, dtype

``prompt_texts`` comes from the training loop (every factory but aesthetic needs it).
"""
from __future__ import annotations

import html
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rft.rewards.base import Reward, register
from rft.rewards.preprocess import ImageTransform, preprocess
from rft.weights import io

OPEN_CLIP_SOT, OPEN_CLIP_EOT = 49406, 49407
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")

# ----------------------------------------------------------------------------- locating


def model_dir_for(path: Any, *, reward: str, key: str, how: str, expected: str) -> str:
  """A local model folder (or cached hub id); FileNotFoundError naming the reward's
  config key and how to get the files."""
  if path is None or path == "":
    raise FileNotFoundError(f"reward {reward!r}: config.reward_options.{reward}.{key} is not "
                            f"set. {how}")
  try:
    return io.resolve_model_dir(path, expected=expected)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"reward {reward!r}: config.reward_options.{reward}.{key}="
                            f"{path!r}: {e} {how}") from None


def weights_file_for(path: Any, *, reward: str, key: str, how: str) -> str:
  """An existing weight file: a local path, or ``hf://<org>/<name>/<file>`` (a file of a
  hub repo: the HF cache's copy, else downloaded unless ``$HF_HUB_OFFLINE`` is set).
  FileNotFoundError naming the config key and where to get it."""
  if path is None or path == "":
    raise FileNotFoundError(f"reward {reward!r}: config.reward_options.{reward}.{key} is not "
                            f"set. {how}")
  path = os.fspath(path)
  where = f"reward {reward!r}: config.reward_options.{reward}.{key}={path!r}"
  if path.startswith("hf://"):
    parts = path[len("hf://"):].split("/")
    if len(parts) < 3 or not all(parts):
      raise ValueError(f"{where}: a hub file is hf://<org>/<name>/<file in the repo>")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download  # pylint: disable=g-import-not-at-top
    offline = io.hub_offline()
    try:
      return hf_hub_download(repo, filename, local_files_only=offline)
    except Exception as e:  # not cached and offline, no network, no such file, ...
      why = "downloads are off (HF_HUB_OFFLINE)" if offline else "downloading it failed"
      raise FileNotFoundError(
          f"{where}: not in the HF cache and {why} "
          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Fetch it with "
          f"`hf download {repo} {filename}` where the network allows. {how}") from None
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: no such file. {how}")
  return path


def as_dtype(dtype) -> Any:
  """A jnp dtype from a dtype or its name ("float32", "bfloat16", "float16")."""
  return jnp.dtype(dtype)


# ----------------------------------------------------------------------------- tokens


def load_tokenizer(path: str):
  """A transformers CLIPTokenizer from a local folder (vocab.json + merges.txt or
  tokenizer.json); no network."""
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True)


def prompt_table(tokenizer, texts: Sequence[str], context_length: int, *,
                 pad_id: int | None = None) -> np.ndarray:
  """[N, context_length] int32: each text as the tokenizer encodes it (BOS, ids, EOS,
  truncated to ``context_length`` keeping EOS), padded with ``pad_id`` (default: the
  tokenizer's pad id)."""
  texts = list(texts)
  if pad_id is None:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
      raise ValueError("the tokenizer has no pad token; pass pad_id")
  table = np.full((len(texts), context_length), pad_id, np.int32)
  if texts:
    enc = tokenizer(texts, padding=False, truncation=True, max_length=context_length)
    for i, ids in enumerate(enc["input_ids"]):
      table[i, :len(ids)] = ids
  return table


def open_clip_clean(text: str) -> str:
  """open_clip's ``basic_clean``: ftfy.fix_text (when ftfy is installed), html.unescape
  twice, strip. (Whitespace folding and lowercasing the tokenizer does itself.)"""
  try:
    import ftfy  # pylint: disable=import-outside-toplevel
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  return html.unescape(html.unescape(text)).strip()


def open_clip_tokens(tokenizer, texts: Sequence[str], context_length: int = 77) -> np.ndarray:
  """open_clip.tokenize's format from a transformers CLIPTokenizer of the same BPE: SOT,
  ids, EOT, zero padding, truncated to ``context_length`` with EOT last; texts cleaned
  as open_clip does (:func:`open_clip_clean`)."""
  if (tokenizer.bos_token_id, tokenizer.eos_token_id) != (OPEN_CLIP_SOT, OPEN_CLIP_EOT):
    raise ValueError(f"expected the CLIP BPE tokenizer (<|startoftext|> = {OPEN_CLIP_SOT}, "
                     f"<|endoftext|> = {OPEN_CLIP_EOT}); got bos/eos ids "
                     f"{tokenizer.bos_token_id}/{tokenizer.eos_token_id}")
  return prompt_table(tokenizer, [open_clip_clean(t) for t in texts], context_length, pad_id=0)


def _check_table(table: np.ndarray, vocab_size: int, reward: str, tokenizer_dir: str,
                 n_texts: int):
  if n_texts == 0:
    raise ValueError(f"reward {reward!r} needs prompt_texts (every prompt of the run's "
                     "prompt set); got none")
  if table.max() >= vocab_size:
    raise ValueError(f"reward {reward!r}: the tokenizer {tokenizer_dir} gives id "
                     f"{int(table.max())} >= the text tower's vocab_size {vocab_size}")


# ----------------------------------------------------------------------------- rewards


def cosine(a, b):
  """Row-wise cosine similarity of [B, P] arrays, in float32."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))


def image_reward(name: str, score: Callable, params: Any, transform: ImageTransform,
                 table: np.ndarray | None = None) -> Reward:
  """A differentiable Reward from ``score(params, pixels, tokens_or_None) -> [B]``.

  ``fn(images, prompts, params)`` preprocesses the images and looks the token rows up
  with ``prompts["ids"]`` inside one ``jax.jit``; the Reward's ``params`` are
  ``{"model": params, "table": token table}``, passed into jitted code as arguments,
  not constants baked into the executable.
  """
  n = None if table is None else len(table)
  table = None if table is None else jnp.asarray(table, jnp.int32)

  def run(params, table, images, ids):
    pixels = preprocess(images, transform)
    tokens = None if table is None else table[ids]
    return score(params, pixels, tokens).astype(jnp.float32)

  run = jax.jit(run)

  def fn(images, prompts, reward_params):
    ids = None
    if n is not None:
      if "ids" not in prompts:
        raise KeyError(f"reward {name!r} needs prompts['ids'] (indices into prompt_texts); "
                       f"got keys {sorted(prompts)}")
      ids = prompts["ids"]
      if not isinstance(ids, jax.core.Tracer):
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= n):
          raise ValueError(f"reward {name!r}: prompt ids must be in [0, {n}) (the "
                           f"prompt_texts it was built with); got {ids.min()}..{ids.max()}")
      ids = jnp.asarray(ids, jnp.int32)
    return run(reward_params["model"], reward_params["table"], images, ids)

  return Reward(name, fn, differentiable=True, params={"model": params, "table": table})


def transform_for(dirs: Sequence[str | None], image_size: int, reward: str) -> ImageTransform:
  """The first folder's preprocessor_config.json, else OpenAI CLIP's at ``image_size``."""
  t = None
  for d in dirs:
    if d is not None and os.path.isfile(os.path.join(d, "preprocessor_config.json")):
      t = ImageTransform.from_model_dir(d)
      break
  if t is None:
    t = ImageTransform(size=image_size, crop=(image_size, image_size))
  if t.crop != (image_size, image_size):
    raise ValueError(f"reward {reward!r}: preprocessor crop_size {t.crop} differs from the "
                     f"model's image_size {image_size}")
  return t


def _tokenizer_dir(tokenizer_path, model_dir: str, *, reward: str, how: str) -> str:
  if tokenizer_path is None or tokenizer_path == "":
    if any(os.path.isfile(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES):
      return model_dir
    raise FileNotFoundError(
        f"reward {reward!r}: {model_dir} has no tokenizer files ({' or '.join(_TOKENIZER_FILES)}"
        f") and config.reward_options.{reward}.tokenizer_path is not set. {how}")
  return model_dir_for(tokenizer_path, reward=reward, key="tokenizer_path", how=how,
                       expected="a CLIP tokenizer (vocab.json + merges.txt or tokenizer.json)")


def _hf_clip_reward(reward: str, model_path, tokenizer_path, prompt_texts, allow_pickle, dtype,
                    how: str, similarity: Callable) -> Reward:
  from rft.weights.clip import load_clip_model  # pylint: disable=import-outside-toplevel
  model_dir = model_dir_for(model_path, reward=reward, key="model_path", how=how,
                            expected="a transformers CLIPModel (config.json + *.safetensors)")
  tok_dir = _tokenizer_dir(tokenizer_path, model_dir, reward=reward, how=how)
  model, params = load_clip_model(model_dir, allow_pickle=allow_pickle, dtype=as_dtype(dtype))
  c = model.config
  table = prompt_table(load_tokenizer(tok_dir), prompt_texts or (),
                       c.text.max_position_embeddings)
  _check_table(table, c.text.vocab_size, reward, tok_dir, len(prompt_texts or ()))
  transform = transform_for([model_dir, tok_dir], c.vision.image_size, reward)

  def score(params, pixels, tokens):
    i = model.apply({"params": params}, pixels, method=model.image_features)
    t = model.apply({"params": params}, tokens, method=model.text_features)
    return similarity(params, cosine(i, t))

  return image_reward(reward, score, params, transform, table)


_PICKSCORE_HOW = ("Get PickScore with `hf download yuvalkirstain/PickScore_v1` and its "
                  "tokenizer / preprocessor with `hf download "
                  "laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (tokenizer_path).")
_CLIPSCORE_HOW = ("Get a CLIP model, e.g. `hf download openai/clip-vit-base-patch32` (the "
                  "CLIPScore paper's ViT-B/32).")
_HPS_HOW = ("HPS_v2_compressed.pt / HPS_v2.1_compressed.pt are in the hub repo xswu/HPSv2 "
            "(weights_file=hf://xswu/HPSv2/HPS_v2_compressed.pt fetches it; pickles: set "
            "--config.reward_options.<hpsv2 or hpsv2.1>.allow_pickle=True, or convert "
            "them to .safetensors) and a CLIP tokenizer folder, e.g. `hf download "
            "openai/clip-vit-large-patch14` or an SD pipeline's tokenizer/ (tokenizer_path).")


@register("pickscore")
def pickscore_reward(model_path: Any = "yuvalkirstain/PickScore_v1", tokenizer_path: Any = None,
                     prompt_texts: Sequence[str] = (), allow_pickle: bool = False,
                     dtype: Any = jnp.float32) -> Reward:
  """PickScore = exp(logit_scale) * cos(image, text) (Kirstain et al. 2023)."""
  return _hf_clip_reward(
      "pickscore", model_path, tokenizer_path, prompt_texts, allow_pickle, dtype,
      _PICKSCORE_HOW, lambda params, cos: jnp.exp(params["logit_scale"]) * cos)


@register("clipscore")
def clipscore_reward(model_path: Any = "openai/clip-vit-base-patch32", tokenizer_path: Any = None,
                     prompt_texts: Sequence[str] = (), allow_pickle: bool = False,
                     dtype: Any = jnp.float32) -> Reward:
  """CLIPScore = 2.5 * max(cos(image, text), 0) (Hessel et al. 2021)."""
  return _hf_clip_reward("clipscore", model_path, tokenizer_path, prompt_texts, allow_pickle,
                         dtype, _CLIPSCORE_HOW, lambda params, cos: 2.5 * jnp.maximum(cos, 0.0))


def _hps_reward(reward: str, weights_file, model, tokenizer_path, prompt_texts, allow_pickle,
                dtype) -> Reward:
  from rft.weights.clip import load_open_clip  # pylint: disable=import-outside-toplevel
  path = weights_file_for(weights_file, reward=reward, key="weights_file", how=_HPS_HOW)
  tok_dir = model_dir_for(tokenizer_path, reward=reward, key="tokenizer_path", how=_HPS_HOW,
                          expected="a CLIP tokenizer (vocab.json + merges.txt or "
                          "tokenizer.json)")
  module, params = load_open_clip(path, model, allow_pickle=allow_pickle, dtype=as_dtype(dtype))
  c = module.config
  table = open_clip_tokens(load_tokenizer(tok_dir), prompt_texts or (), c.text.context_length)
  _check_table(table, c.text.vocab_size, reward, tok_dir, len(prompt_texts or ()))
  # HPSv2's preprocess_val: open_clip's image_transform (resize shortest side, center
  # crop, OpenAI mean / std).
  size = c.vision.image_size
  transform = ImageTransform(size=size, crop=(size, size))

  def score(params, pixels, tokens):
    i = module.apply({"params": params}, pixels, method=module.image_features)
    t = module.apply({"params": params}, tokens, method=module.text_features)
    return cosine(i, t)

  return image_reward(reward, score, params, transform, table)


@register("hpsv2")
def hpsv2_reward(weights_file: Any = None, model: Any = "ViT-H-14",
                 tokenizer_path: Any = "openai/clip-vit-large-patch14",
                 prompt_texts: Sequence[str] = (), allow_pickle: bool = False,
                 dtype: Any = jnp.float32) -> Reward:
  """HPSv2 = cos(image, text) of the HPSv2 open_clip ViT-H-14 (Wu et al. 2023)."""
  return _hps_reward("hpsv2", weights_file, model, tokenizer_path, prompt_texts, allow_pickle,
                     dtype)


@register("hpsv2.1")
def hpsv21_reward(weights_file: Any = None, model: Any = "ViT-H-14",
                  tokenizer_path: Any = "openai/clip-vit-large-patch14",
                  prompt_texts: Sequence[str] = (), allow_pickle: bool = False,
                  dtype: Any = jnp.float32) -> Reward:
  """HPSv2.1: the HPSv2 formula with the v2.1 weights (HPS_v2.1_compressed.pt)."""
  return _hps_reward("hpsv2.1", weights_file, model, tokenizer_path, prompt_texts,
                     allow_pickle, dtype)
