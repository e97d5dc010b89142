"""Tiny random Stable Diffusion pipelines in diffusers format, built with the reference
libraries on torch CPU and saved the way the hub serves them (no download anywhere)."""
from __future__ import annotations

import json
import os


def byte_level_clip_tokenizer(out_dir: str):
  """A CLIPTokenizer with no merges: every character is a token (byte-level BPE alphabet
  plus its end-of-word forms and the two specials). Real CLIP vocabularies cannot be
  downloaded here; this one has the same format and special-token handling."""
  from transformers import CLIPTokenizer
  # GPT-2 / CLIP byte-to-unicode alphabet: printable bytes map to themselves, the rest to
  # code points from 256 on.
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  extra = [b for b in range(256) if b not in keep]
  chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]
  vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(out_dir, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  tok = CLIPTokenizer(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"),
                      model_max_length=16, pad_token="<|endoftext|>")
  tok.save_pretrained(out_dir)
  return tok


def perturb_(module, scale: float = 0.02, seed: int = 0):
  """Adds small noise to every parameter, so zero-initialised layers (conv_out, ...) do
  not hide conversion errors."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return module


def tiny_sd_folder(path: str, *, variant: str = "sd1", seed: int = 0) -> str:
  """Writes model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.

  variant "sd1": conv projections, 2 heads, cross dim 32, quick_gelu text encoder;
  "sd2": linear projections, per-block heads, gelu text encoder, v-prediction.
  Latents 8x8x4 (images 16x16).
  """
  import torch
  from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                         UNet2DConditionModel)
  from transformers import CLIPTextConfig, CLIPTextModel

  torch.manual_seed(seed)
  tok = byte_level_clip_tokenizer(os.path.join(path, "_tok"))
  sd2 = variant == "sd2"
  text_cfg = CLIPTextConfig(
      vocab_size=len(tok), hidden_size=32 if not sd2 else 48, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=2 if not sd2 else 4,
      max_position_embeddings=16, hidden_act="gelu" if sd2 else "quick_gelu",
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id, projection_dim=32)
  text = perturb_(CLIPTextModel(text_cfg), seed=seed + 1).eval()
  unet = perturb_(UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
      block_out_channels=(16, 32), norm_num_groups=8,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=text_cfg.hidden_size,
      attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2), seed=seed + 2).eval()
  vae = perturb_(AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      layers_per_block=1, norm_num_groups=4, sample_size=16), seed=seed + 3).eval()
  sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                        prediction_type="v_prediction" if sd2 else "epsilon")
  pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                 scheduler=sched, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
  pipe.save_pretrained(path, safe_serialization=True)
  return path


def unigram_t5_tokenizer(out_dir: str, model_max_length: int = 32):
  """A T5 tokenizer (``tokenizer.json`` with a Unigram model, metaspace pre-tokenizer,
  ``</s>`` appended) trained offline on a few strings: pad 0, eos 1, unk 2, as T5's.
  Real T5 vocabularies cannot be downloaded here."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import T5TokenizerFast
  texts = ["a photo of a cat", "a red dog on the grass", "an astronaut riding a horse",
           "the quick brown fox jumps over the lazy dog", "a painting of a mountain lake"]
  tok = Tokenizer(models.Unigram())
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
  tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
  tok.train_from_iterator(texts, trainers.UnigramTrainer(
      vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
      initial_alphabet=list("abcdefghijklmnopqrstuvwxyz")))
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                         pad_token="<pad>", extra_ids=0, model_max_length=model_max_length)
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return fast


def tiny_sd3_folder(path: str, seed: int = 0) -> str:
  """A tiny random ``StableDiffusion3Pipeline`` saved with ``save_pretrained``:
  transformer/ (SD3Transformer2DModel, 16 latent channels, patch 2, joint dim 48),
  vae/ (16 latent channels, no quant convs, shift_factor), text_encoder/ (CLIP-L-like:
  quick_gelu, legacy eos_token_id=2, width 16), text_encoder_2/ (CLIP-G-like: gelu, eos
  id pooling, width 24, pad "!"), text_encoder_3/ (gated-gelu T5, d_model 48,
  d_kv * heads = 32), byte-level CLIP tokenizers (77 -> 16 tokens), a Unigram T5
  tokenizer and FlowMatchEulerDiscreteScheduler(shift=3.0). Latents 8x8x16."""
  import torch
  from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler,
                         SD3Transformer2DModel, StableDiffusion3Pipeline)
  from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer,
                            T5Config, T5EncoderModel)

  torch.manual_seed(seed)
  tok = byte_level_clip_tokenizer(os.path.join(path, "_tok"))
  tok_2 = CLIPTokenizer.from_pretrained(os.path.join(path, "_tok"), pad_token="!")
  tok_3 = unigram_t5_tokenizer(os.path.join(path, "_tok3"))

  def clip(seed_, **kw):
    cfg = CLIPTextConfig(vocab_size=len(tok), intermediate_size=40, num_hidden_layers=3,
                         max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         pad_token_id=tok.pad_token_id, **kw)
    return perturb_(CLIPTextModelWithProjection(cfg), seed=seed_).eval()

  text = clip(seed + 1, hidden_size=16, num_attention_heads=2, hidden_act="quick_gelu",
              projection_dim=12, eos_token_id=2)
  text_2 = clip(seed + 2, hidden_size=24, num_attention_heads=4, hidden_act="gelu",
                layer_norm_eps=1e-6, projection_dim=20, eos_token_id=tok.eos_token_id)
  text_3 = perturb_(T5EncoderModel(T5Config(
      vocab_size=len(tok_3), d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=16,
      feed_forward_proj="gated-gelu", dropout_rate=0.0)), seed=seed + 3).eval()
  transformer = perturb_(SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16,
      pooled_projection_dim=32, out_channels=16, pos_embed_max_size=8), seed=seed + 4).eval()
  vae = perturb_(AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      layers_per_block=1, norm_num_groups=4, sample_size=16, use_quant_conv=False,
      use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
      seed=seed + 5).eval()
  pipe = StableDiffusion3Pipeline(
      transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
      text_encoder=text, tokenizer=tok, text_encoder_2=text_2, tokenizer_2=tok_2,
      text_encoder_3=text_3, tokenizer_3=tok_3)
  pipe.save_pretrained(path, safe_serialization=True)
  return path
