"""W3: tokens/s of rft's KV-cached sampler vs transformers' `generate`, same weights.

Workload W3 of ../shared/BENCHMARKS.md: a random Llama (vocab 1024, hidden 256, MLP 688,
4 layers, 8 heads, 4 KV heads; about 3.4 M params) built by transformers on torch, saved
as safetensors and loaded into rft with `rft.weights.hf_lm.load_lm`. Batch 32, prompt
32 tokens, 96 new tokens, temperature 1, no top-k / top-p, no early stop (EOS never
ends a row, so both sides produce exactly batch x 96 tokens), per-token log-probs on
both sides (ours: recorded by the sampler; transformers: `output_logits=True`, then a
log-softmax gather, timed with the generation).

  python benchmarks/lm_sampling.py                       # W3 (CPU)
  python benchmarks/lm_sampling.py --preset gpu_large    # a ~110 M Llama, batch 256, bf16

Prints each side's median tokens/s over --reps timed runs (after one warm-up run, which
compiles ours) and the ratio ours / transformers.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

PRESETS = {
    "w3": dict(vocab=1024, hidden=256, mlp=688, layers=4, heads=8, kv_heads=4, batch=32,
               prompt=32, new=96, dtype="float32"),
    "gpu_large": dict(vocab=32000, hidden=768, mlp=2048, layers=12, heads=12, kv_heads=4,
                      batch=256, prompt=64, new=256, dtype="bfloat16"),
}


def build_hf(p, path):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"],
                    intermediate_size=p["mlp"], num_hidden_layers=p["layers"],
                    num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                    max_position_embeddings=p["prompt"] + p["new"] + 8,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
  model = LlamaForCausalLM(cfg).eval()
  model.save_pretrained(path, safe_serialization=True)
  return model


def torch_side(model, prompts, p, device, reps):
  import torch
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[p["dtype"]]
  model = model.to(device=device, dtype=dtype)
  ids = torch.as_tensor(prompts, device=device)
  attn = torch.ones_like(ids)

  def run(seed):
    torch.manual_seed(seed)
    with torch.no_grad():
      out = model.generate(ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, max_new_tokens=p["new"], min_new_tokens=p["new"],
                           output_logits=True, return_dict_in_generate=True,
                           pad_token_id=0)
      new = out.sequences[:, ids.shape[1]:]
      logits = torch.stack(out.logits, dim=1).float()
      lp = torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0]
      if device != "cpu":
        torch.cuda.synchronize()
    return new, lp

  run(0)
  times = []
  for r in range(reps):
    t0 = time.perf_counter()
    new, _ = run(r + 1)
    times.append(time.perf_counter() - t0)
  assert new.shape == (p["batch"], p["new"]), new.shape
  return statistics.median(times)


def rft_side(path, prompts, p, reps):
  import dataclasses
  from rft.lm import sampling
  from rft.weights.hf_lm import load_lm
  cfg, params = load_lm(path)
  cfg = dataclasses.replace(cfg, dtype=p["dtype"])
  if p["dtype"] != "float32":
    params = jax.tree.map(lambda x: x.astype(p["dtype"]), params)
  pt = jnp.asarray(prompts)
  pm = jnp.ones_like(pt, bool)
  sc = sampling.SamplingConfig(max_new_tokens=p["new"], temperature=1.0)

  def run(seed):
    out = sampling.generate(cfg, params, pt, pm, jax.random.key(seed), sampling=sc,
                            eos_id=-1, pad_id=0)
    return jax.block_until_ready(out)

  run(0)
  times = []
  for r in range(reps):
    t0 = time.perf_counter()
    out = run(r + 1)
    times.append(time.perf_counter() - t0)
  assert out.tokens.shape == (p["batch"], p["new"]) and float(out.mask.min()) == 1.0
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="w3", choices=sorted(PRESETS))
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  p = PRESETS[args.preset]
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  prompts = np.random.default_rng(0).integers(3, p["vocab"], (p["batch"], p["prompt"]),
                                              dtype=np.int64).astype(np.int32)
  with tempfile.TemporaryDirectory() as d:
    model = build_hf(p, d)
    n_params = sum(x.numel() for x in model.parameters())
    ours = rft_side(d, prompts, p, args.reps)
    theirs = torch_side(model, prompts.astype(np.int64), p, device, args.reps)
  tokens = p["batch"] * p["new"]
  print(f"preset {args.preset}: Llama {n_params / 1e6:.2f} M params, batch {p['batch']}, "
        f"prompt {p['prompt']}, {p['new']} new tokens, {p['dtype']}, "
        f"jax {jax.default_backend()} / torch {device} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)")
  print(f"  rft generate (jit, KV cache, log-probs): {ours:8.3f} s  "
        f"{tokens / ours:10.0f} tokens/s")
  print(f"  transformers generate + log-probs:       {theirs:8.3f} s  "
        f"{tokens / theirs:10.0f} tokens/s")
  print(f"  ratio (rft / transformers tokens/s): {theirs / ours:.2f}x")


if __name__ == "__main__":
  main()
