"""Training-state bytes per device under rft's sharding rules, from shapes only.

No array is allocated and no device is needed: params come from ``jax.eval_shape`` of the
real Flax modules (``rft.models.sd_unet``, ``rft.models.lm``), optimizer state from
``jax.eval_shape(optax.adamw(...).init, params)``, and every leaf's per-device bytes from
its ``PartitionSpec`` (``rft.sharding.bytes_per_device``: a dim of size d split over mesh
axes of total size n holds ceil(d / n) per device). Meshes are {axis: size} dicts of 8
devices: ``data=8`` (params replicated), ``fsdp=8``, ``fsdp=4 x tensor=2``; the rules are
``UNET_RULES`` / ``LM_RULES`` (Megatron tensor split + FSDP of params >= 2**18 elements).

Workloads (all float32 state):

* SD 1.5 UNet full finetune, AdamW: params + grads + Adam mu + nu (+ int32 count).
* SD 1.5 UNet LoRA rank 4 on the transformer blocks' attention projections
  (to_q/k/v/out_0): frozen base params (sharded by the rules) + LoRA factors, their grads
  and Adam state (DEFAULT_RULES: all far below min_size, so replicated).
* Qwen2.5-1.5B-like and Llama-2-7B-like LMs, GRPO: policy params + grads + Adam, plus a
  frozen reference copy (same sharding) when beta > 0.

Grads are counted once with the params' sharding (what a jitted step reduce-scatters
them to). Not included: activations, rollout buffers / KV caches, XLA temporaries, the
runtime's reserve (on GPU, XLA preallocates 75% of memory by default). So "fits" is a
necessary condition, not a sufficient one; capacities are GiB (2**30 bytes).

  python benchmarks/memory_table.py [--capacities 16 32 80]
"""
from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rft import sharding as S
from rft.models import lora, sd_unet
from rft.models.lm import DecoderLM, LMConfig

GiB = 2 ** 30
MESHES = {"data=8": {"data": 8}, "fsdp=8": {"fsdp": 8}, "fsdp=4 x tensor=2": {"fsdp": 4, "tensor": 2}}
LORA_TARGETS = r"transformer_blocks_\d+/attn\d+/to_(q|k|v|out_0)/kernel$"

SD15 = sd_unet.UNetConfig(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                          attention_head_dim=8, layers_per_block=2, sample_size=64)
LMS = {
    # Qwen2.5-1.5B: q/k/v biases, tied embeddings (as the published model).
    "Qwen2.5-1.5B-like": LMConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                  num_layers=28, num_heads=12, num_kv_heads=2,
                                  attention_bias=True, o_proj_bias=False,
                                  tie_word_embeddings=True),
    "Llama-2-7B-like": LMConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                num_layers=32, num_heads=32, num_kv_heads=32),
}


def unet_shapes():
  return jax.eval_shape(lambda k: sd_unet.init_params(SD15, k), jax.random.key(0))


def lm_shapes(cfg: LMConfig):
  t = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda k: DecoderLM(cfg).init(k, t, t, jnp.ones((1, 4), bool))["params"],
                        jax.random.key(0))


def count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def nbytes(tree) -> int:
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def trainable(params, rules, mesh):
  """(params bytes/device, Adam bytes/device, replicated leaves, their bytes) for ``params``
  trained with AdamW under ``rules`` on ``mesh``."""
  specs = S.param_specs(params, rules, mesh)
  tx = optax.adamw(1e-4)
  opt = jax.eval_shape(tx.init, params)
  p = S.bytes_per_device(params, specs, mesh)
  o = S.bytes_per_device(opt, S.opt_state_specs(tx, params, specs), mesh)
  flat_s = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  rep = [x for x, s in zip(jax.tree.leaves(params), flat_s) if s == jax.sharding.PartitionSpec()]
  return p, o, len(rep), nbytes(rep)


def rows():
  out = []
  print("How the numbers are made (per device, float32 = 4 bytes):")
  u = unet_shapes()
  lo = jax.eval_shape(lambda k: lora.init(u, k, 4, LORA_TARGETS), jax.random.key(0))
  print(f"  SD 1.5 UNet: {count(u):,} params ({nbytes(u) / GiB:.3f} GiB); LoRA r=4 on "
        f"{len(lo)} attention projections: {count(lo):,} params")
  for mname, mesh in MESHES.items():
    p, o, nrep, brep = trainable(u, S.UNET_RULES, mesh)
    print(f"    [{mname}] params P = {p:,} B ({nrep} leaves / {brep / 2**20:.1f} MiB replicated), "
          f"Adam mu+nu+count A = {o:,} B, grads G = P")
    out.append(("SD1.5 UNet", "full FT AdamW", mname, p, p, o, 0))
    lp, lo_opt, _, _ = trainable(lo, S.DEFAULT_RULES, mesh)
    print(f"    [{mname}] LoRA: frozen base = P; LoRA L = {lp:,} B, its grads = L, its Adam = "
          f"{lo_opt:,} B")
    out.append(("SD1.5 UNet", "LoRA r4 AdamW", mname, lp, lp, lo_opt, p))
  for name, cfg in LMS.items():
    shapes = lm_shapes(cfg)
    print(f"  {name}: {count(shapes):,} params ({nbytes(shapes) / GiB:.3f} GiB)")
    for mname, mesh in MESHES.items():
      p, o, nrep, brep = trainable(shapes, S.LM_RULES, mesh)
      print(f"    [{mname}] params P = {p:,} B ({nrep} leaves / {brep / 2**20:.1f} MiB "
            f"replicated), Adam A = {o:,} B, grads G = P, reference R = P (beta > 0)")
      out.append((name, "GRPO beta=0", mname, p, p, o, 0))
      out.append((name, "GRPO beta>0", mname, p, p, o, p))
  print("  total = params + grads + Adam + frozen (LoRA base or GRPO reference)")
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--capacities", type=float, nargs="+", default=[16, 32, 80],
                  help="device memory sizes in GiB")
  args = ap.parse_args()
  table = rows()
  caps = args.capacities
  head = (f"{'model':<18} {'method':<14} {'mesh (8 dev)':<18} {'params':>8} {'grads':>8} "
          f"{'adam':>8} {'frozen':>8} {'total':>8}  " + " ".join(f"{c:>4g}G" for c in caps))
  print("\nTraining state per device, GiB (activations NOT included):")
  print(head)
  print("-" * len(head))
  for model, method, mesh, p, g, o, f in table:
    total = p + g + o + f
    fits = " ".join(f"{'yes' if total <= c * GiB else 'no':>5}" for c in caps)
    print(f"{model:<18} {method:<14} {mesh:<18} {p / GiB:8.2f} {g / GiB:8.2f} {o / GiB:8.2f} "
          f"{f / GiB:8.2f} {total / GiB:8.2f}  {fits}")
  print("\n'yes' = the state alone fits; activations, rollouts / KV caches, XLA temporaries "
        "and the runtime's reserve come on top.")


if __name__ == "__main__":
  main()
