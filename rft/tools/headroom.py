"""Where a ShapesWorld base model can still gain: per caption, family and cell.

Three measurements on the small-scale (T1) captions, i.e. the `train_prompts` fixed
training captions of rft.worlds.diffusion_worlds (seed 0 draws T1's 32):

* `captions`: per caption, the evaluator's alignment over `--samples` samples of the RL
  sampler (10 DDIM steps, eta 1, CFG 1), and where the objects went: the fraction of
  samples with an object in each cell (TL, TR, BL, BR) and the histogram of object counts.
  The ceiling line adds up what the captions without a position word could still gain.
* `groups`: the share of each family's reward variance left within groups of samples that
  share x_T (`pipe.sample(share_within=16)`): what the step noise, the only thing a
  likelihood-ratio gradient can credit, decides.
* `supervised`: a capacity probe: `--steps` Adam steps of the training denoising loss on
  ground-truth renders of those captions (the true answer, not reward finetuning), only
  the params matching `--trainable`, alignment per family every quarter.

  python -m rft.tools.headroom captions --train_prompts 32 --samples 64
  python -m rft.tools.headroom groups
  python -m rft.tools.headroom supervised --trainable '^unet/(mid|down2|up2)' --lr 3e-4
  python -m rft.tools.headroom positions [--base_dir DIR]

* `positions`: whether the denoiser reads position words at all: the eps loss on true
  renders of "... at the <cell>" captions with the cell swapped to the opposite one,
  relative to the true caption's, at t = 850, 900, 950, 980.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from rft import pretrained
from rft.data import shapes
from rft.diffusion.pipeline import SamplerConfig, world_pipeline
from rft.rewards.shapes_alignment import Scorer
from rft.worlds import shapes_eval

CELLS = ("TL", "TR", "BL", "BR")
POSITION_WORDS = ("at the", "above", "below", "left of", "right of")


def has_position(text: str) -> bool:
  return any(w in text for w in POSITION_WORDS)


class Setup:
  def __init__(self, base_dir=None, train_prompts: int = 32, seed: int = 0):
    self.model, self.params, self.meta = pretrained.load_shapes_base(base_dir)
    self.pipe = world_pipeline(self.model, self.meta["schedule"])
    self.world = shapes.ShapesWorld(self.meta["holdout_fraction"], self.meta["split_seed"])
    self.tokens = shapes.tokenizer().encode(self.world.texts)
    self.judge = shapes_eval.make_judge(Scorer.load("shapes_evaluator"))
    self.ids = self.world.eval_prompt_ids("train", train_prompts, seed=seed)
    name = self.meta["sampler"].get("name", "ddim")  # a flow base: its own noise level
    eta = 1.0 if name == "ddim" else self.meta["sampler"]["eta"]
    self.cfg = SamplerConfig(10, eta, 1.0, 1.0, name)
    self._samplers = {}  # share_within -> jitted sampler (compiled once per setting)

  def sampler(self, share_within: int = 1):
    """sample(params, tokens, key) -> images with the RL sampler, jitted once per setting."""
    if share_within not in self._samplers:
      self._samplers[share_within] = jax.jit(lambda p, t, k: self.pipe.sample(
          p, t, k, self.cfg, share_within=share_within)[0].sample)
    return self._samplers[share_within]

  def judge_samples(self, params, ids, key, share_within: int = 1, batch: int = 256):
    cells, aligned = [], []
    sample = self.sampler(share_within)
    for i, s in enumerate(range(0, len(ids), batch)):
      chunk = ids[s:s + batch]
      im = sample(params, jnp.asarray(self.tokens[chunk]), jax.random.fold_in(key, i))
      o = jax.device_get(self.judge(im, self.world.assignments(chunk)))
      cells.append(np.asarray(o["cells"]))
      aligned.append(np.asarray(o["aligned"]))
    return np.concatenate(cells), np.concatenate(aligned)

  def families(self, ids):
    return [shapes.FAMILIES[f] for f in self.world.family_ids[ids]]


def captions(a) -> dict:
  s = Setup(a.base_dir, a.train_prompts)
  n = a.samples
  cells, aligned = s.judge_samples(s.params, np.repeat(s.ids, n), jax.random.key(a.seed))
  cells, aligned = cells.reshape(len(s.ids), n, -1), aligned.reshape(len(s.ids), n)
  rows = []
  for j in np.argsort(aligned.mean(1)):
    text = s.world.texts[s.ids[j]]
    occ = (cells[j] > 0).mean(0)
    count = np.bincount((cells[j] > 0).sum(1), minlength=5)
    rows.append((float(aligned[j].mean()), s.families(s.ids[j:j + 1])[0], has_position(text),
                 text))
    where = " ".join(f"{c} {o:.2f}" for c, o in zip(CELLS, occ))
    print(f"{aligned[j].mean():.2f}  {rows[-1][1]:8s}  cells [{where}]"
          f"  objects {count.tolist()}  {text}")
  pos = np.array([r[2] for r in rows])
  rate = np.array([r[0] for r in rows])
  out = {"alignment": float(rate.mean()), "captions": len(rows),
         "with_position_word": int(pos.sum()),
         "alignment_with_position": float(rate[pos].mean()) if pos.any() else None,
         "alignment_without_position": float(rate[~pos].mean()) if (~pos).any() else None,
         # points the captions without a position word could add if all reached 100 %
         "ceiling_without_position_points": float(100 * (1 - rate[~pos]).sum() / len(rows))}
  print(out)
  return out


def groups(a) -> dict:
  s = Setup(a.base_dir, a.train_prompts)
  g, x = 16, a.groups
  fams = np.array(s.families(s.ids))
  out = {}
  for fam in shapes.FAMILIES:
    sel = s.ids[fams == fam][:8]
    if not len(sel):
      continue
    _, al = s.judge_samples(s.params, np.repeat(sel, g * x), jax.random.key(a.seed),
                            share_within=g)
    al = al.astype(np.float32).reshape(len(sel), x, g)
    total, within = al.reshape(len(sel), -1).var(1).mean(), al.var(2).mean()
    out[fam] = {"alignment": float(al.mean()), "within_share": float(within / max(total, 1e-9)),
                "groups_without_variance": float((al.var(2) == 0).mean())}
    print(fam, out[fam], flush=True)
  return out


def supervised(a) -> dict:
  import optax

  from rft.train.diffusion_rl import overlay, select_leaves, trainable_mask
  from rft.train.pretrain import denoising_loss
  s = Setup(a.base_dir, a.train_prompts)
  pipe, base = s.pipe, s.params
  trained = select_leaves(base, trainable_mask(base, a.trainable))
  tx = optax.adam(a.lr)
  opt = tx.init(trained)

  @jax.jit
  def step(tr, opt, base, x0, tok, key):
    def loss_fn(tr):
      return denoising_loss(pipe, overlay(tr, base), x0, tok, key, 0.1)[0]
    loss, g = jax.value_and_grad(loss_fn)(tr)
    u, opt = tx.update(g, opt, tr)
    return optax.apply_updates(tr, u), opt, loss

  eval_ids = np.repeat(s.ids, 8)
  fams = np.array(s.families(eval_ids))

  def evaluate(p, at):
    _, al = s.judge_samples(p, eval_ids, jax.random.key(a.seed + 1))
    m = {"step": at, "alignment": float(al.mean()),
         **{f: float(al[fams == f].mean()) for f in shapes.FAMILIES if (fams == f).any()}}
    print(m, flush=True)
    return m

  history = [evaluate(base, 0)]
  rng, t0 = np.random.default_rng(a.seed), time.time()
  for i in range(1, a.steps + 1):
    ids = rng.choice(s.ids, a.batch)
    cells = s.world.sample_scenes(rng, ids)
    x0 = shapes.render(jnp.asarray(cells), jnp.asarray(shapes.sample_offsets(rng, cells)))
    trained, opt, _ = step(trained, opt, base, x0, jnp.asarray(s.tokens[ids]),
                           jax.random.key(i))
    if i % max(a.steps // 4, 1) == 0:
      history.append(evaluate(overlay(trained, base), i))
  print(f"{a.steps} steps x {a.batch} renders in {time.time() - t0:.0f} s")
  return {"history": history}


# The cell a caption's position is swapped to: the opposite cell, the other row (same
# column), the other column (same row).
SWAPS = {
    "opposite": {"top left": "bottom right", "top right": "bottom left",
                 "bottom left": "top right", "bottom right": "top left"},
    "row": {"top left": "bottom left", "top right": "bottom right",
            "bottom left": "top left", "bottom right": "top right"},
    "column": {"top left": "top right", "top right": "top left",
               "bottom left": "bottom right", "bottom right": "bottom left"},
}


def positions(a) -> dict:
  """Does the denoiser read position words? For captions "... at the <cell>", the eps loss
  on ground-truth renders with the caption's cell swapped (to the opposite cell, to the
  other row, to the other column), relative to the true caption's, at high-noise
  timesteps (0: the words are ignored). Row and column separate "reads top/bottom" from
  "reads left/right"."""
  s = Setup(a.base_dir, a.train_prompts)
  if s.pipe.prediction != "eps":
    raise ValueError("headroom positions: needs an eps-prediction (UNet) base")
  ids = np.array([i for i, t in enumerate(s.world.texts) if " at the " in t][:a.samples * 4])
  texts = [s.world.texts[i] for i in ids]
  swapped = {name: [t[:-len(k)] + v for t in texts for k, v in swap.items() if t.endswith(k)]
             for name, swap in SWAPS.items()}
  rng = np.random.default_rng(a.seed)
  x0 = jnp.asarray(shapes.render_np(s.world.sample_scenes(rng, ids), rng))
  tok = shapes.tokenizer()
  tokens = [jnp.asarray(tok.encode(x)) for x in (texts, *swapped.values())]
  ac = s.pipe.schedule.alphas_cumprod

  @jax.jit
  def losses(params, t, key):
    eps = jax.random.normal(key, x0.shape)
    x_t = jnp.sqrt(ac[t]) * x0 + jnp.sqrt(1 - ac[t]) * eps
    tt = jnp.full((len(ids),), t)
    return [jnp.mean((s.pipe.eps_fn(params, x_t, tt, s.pipe.encode(params, k)) - eps) ** 2)
            for k in tokens]

  out = {name: {} for name in SWAPS}
  for t in (850, 900, 950, 980):
    true, *swaps = losses(s.params, t, jax.random.key(t))
    for name, swap in zip(SWAPS, swaps):
      out[name][t] = float(swap / true - 1)
  print({"captions": len(ids), "relative_loss_increase_when_swapped": out})
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("what", choices=("captions", "groups", "supervised", "positions"))
  ap.add_argument("--base_dir", default=None, help="base bundle folder (default: rft/assets)")
  ap.add_argument("--train_prompts", type=int, default=32)
  ap.add_argument("--samples", type=int, default=64, help="captions: samples per caption")
  ap.add_argument("--groups", type=int, default=8, help="groups: x_T groups per caption")
  ap.add_argument("--trainable", default="^(unet|dit)/", help="supervised: params trained")
  ap.add_argument("--lr", type=float, default=3e-4)
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  return {"captions": captions, "groups": groups, "supervised": supervised,
          "positions": positions}[a.what](a)


if __name__ == "__main__":
  main()
