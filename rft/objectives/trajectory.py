"""Log-prob gradients through stored denoising trajectories, in memory flat in T.

PRDP, DDPO and every other objective that scores stored transitions need

    d loss / d theta = sum_t sum_i  (d loss / d lp[i, t]) * d lp[i, t] / d theta

where lp[i, t] = log p_theta(x_{t-1} | x_t, c) of sample i at step t (the sampler's step). The
naive way differentiates one program holding all T steps' activations, so memory grows
with T. Here the gradient is accumulated one step at a time inside a `lax.scan`:

* separable losses (DDPO: loss = mean_t loss_t(lp[:, t])) take value_and_grad of each
  step's term and sum the param gradients;
* coupled losses (PRDP's pair regression on sum_t lp) first compute all lp in a forward
  pass without gradients (or reuse the sampler's stored values when theta == theta_old),
  take the cotangent g = d loss / d lp [n, T] of the small loss kernel, then accumulate
  vjp(lp_t)(g[:, t]) step by step.

Either way peak memory is one step's forward + backward, whatever T is.

`unroll`: XLA:CPU runs convolution *backward* passes inside a while loop (a rolled
`lax.scan`) 10-20x slower than the same ops unrolled (measured: 34 s vs 1.5 s for 3
steps of the ShapesWorld UNet), so on CPU the step scans are unrolled (`auto_unroll()`);
on GPU/TPU they stay rolled, which keeps compile time and program size independent of T. A random subset
of steps (DDPO's timestep_fraction) gives an unbiased estimate: the selected steps'
cotangents are scaled by T / |subset|.

Batch keys (all with leading sample dim n unless noted): "latents" [n, T+1, ...],
"timesteps" / "prev_timesteps" [T], "log_probs" [n, T] (sampler's, theta_old), "cond"
(text states, stored at sampling so recompute is bitwise), "null_cond" (leading dim 1).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rft.diffusion import guidance, sampling


@dataclasses.dataclass(frozen=True)
class StepScorer:
  """Scores stored transitions with the sampler's own per-step function (ratio exactly 1).

  model_fn(params, x, t, cond) -> model output; sampler: the rollout's sampler
  (rft.diffusion.sampling) with its settings; guidance_scale: the rollout's CFG scale.
  """

  model_fn: Callable
  sampler: Any
  guidance_scale: float
  reduce: str = "mean"  # per-step log-prob over latent dims: "mean" (DDPO) or "sum"

  def step(self, params, batch, j) -> jax.Array:
    """lp [n] of transition j (traced int) of every sample in the batch."""
    lat = batch["latents"]
    x_t = jnp.take(lat, j, axis=1)
    x_prev = jnp.take(lat, j + 1, axis=1)
    t = jnp.take(batch["timesteps"], j)
    prev_t = jnp.take(batch["prev_timesteps"], j)
    lp_mean, lp_sum = sampling.transition_log_prob(
        self.model_fn, params, self.sampler, x_t, x_prev, t, prev_t, batch["cond"],
        batch["null_cond"], guidance_scale=self.guidance_scale)
    return lp_mean if self.reduce == "mean" else lp_sum

  def step_kl(self, params, ref_params, batch, j) -> tuple[jax.Array, jax.Array]:
    """(lp [n], kl [n]) of transition j: the log-prob as `step` computes it, and the
    sampler's step KL (`sampler.step_kl`) to the same step under `ref_params` (no
    gradient through the reference)."""
    lat = batch["latents"]
    x_t = jnp.take(lat, j, axis=1)
    x_prev = jnp.take(lat, j + 1, axis=1)
    t = jnp.take(batch["timesteps"], j)
    prev_t = jnp.take(batch["prev_timesteps"], j)
    _, (lp_mean, lp_sum), out = sampling.model_step(
        self.model_fn, params, self.sampler, x_t, t, prev_t, batch["cond"], batch["null_cond"],
        self.guidance_scale, prev_sample=x_prev, return_out=True)
    ref_out = jax.lax.stop_gradient(guidance.guided_eps(
        self.model_fn, ref_params, x_t, t, batch["cond"], batch["null_cond"],
        self.guidance_scale))
    kl = self.sampler.step_kl(out, ref_out, t, prev_t, x_t)
    return (lp_mean if self.reduce == "mean" else lp_sum), kl

  def all_steps(self, params, batch) -> jax.Array:
    """lp [n, T] of every stored transition (forward only: a scan, no gradients kept)."""
    params = jax.lax.stop_gradient(params)
    num = batch["latents"].shape[1] - 1

    def body(c, j):
      return c, self.step(params, batch, j)

    _, lps = jax.lax.scan(body, None, jnp.arange(num))
    return lps.T


def auto_unroll(setting: str = "auto"):
  """`unroll` for the gradient scans from "auto" (full on CPU, rolled elsewhere), "full", "none"."""
  if setting == "auto":
    return True if jax.default_backend() == "cpu" else 1
  if setting in ("full", "none"):
    return True if setting == "full" else 1
  raise ValueError(f"config.unroll={setting!r}; use 'auto', 'full' or 'none'")


def select_steps(key, num_steps: int, fraction: float, skip_last: int = 0
                 ) -> tuple[jax.Array, float]:
  """Step indices that get gradients, and the scale |candidates| / |subset|.

  Candidates are the first T - skip_last steps; a random max(1, round(fraction * n))
  of them are taken (fraction 1: all). skip_last > 0 drops the final, lowest-noise steps
  from the gradient (their log-prob gradients scale like 1/sigma_t and dominate the
  update with noise while the image's composition is set at high noise: measured on
  ShapesWorld, step 9 of 10 has a 15-30x larger gradient norm than steps 1-8); it is a
  biased, lower-variance estimator, off (0) by default.
  """
  n = num_steps - int(skip_last)
  if n < 1:
    raise ValueError(f"skip_last={skip_last} leaves no step of {num_steps} with a gradient")
  k = max(1, int(round(fraction * n)))
  if k >= n:
    return jnp.arange(n), 1.0
  return jnp.sort(jax.random.permutation(key, n)[:k]), n / k


def sde_window_start(epoch: int, num_steps: int, size: int, stride: int = 1, every: int = 1,
                     roll_back: bool = True) -> int:
  """First step of MixGRPO's SDE window at `epoch` (Li et al. 2025, progressive strategy):
  it moves `stride` steps every `every` epochs from 0; starts past num_steps − size go
  back to 0 and around again (roll_back) or stay at the last start."""
  last = num_steps - size
  start = (epoch // every) * stride
  if start <= last:
    return start
  if not roll_back:
    return last
  period = last // stride + 1  # starts 0, stride, ..., up to last
  return ((epoch // every) % period) * stride


def window_mask(steps: jax.Array, num_steps: int) -> jax.Array:
  """bool [num_steps]: True at the given step indices."""
  return jnp.zeros((num_steps,), bool).at[steps].set(True)


def coupled_grads(scorer: StepScorer, materialize: Callable, trainable: Any, batch: dict,
                  loss_from_log_probs: Callable, key, *, timestep_fraction: float = 1.0,
                  log_probs: jax.Array | None = None, skip_last: int = 0, unroll=1,
                  steps: jax.Array | None = None):
  """(loss, metrics, grads) of loss_from_log_probs(lp [n, T], batch) w.r.t. `trainable`.

  params = materialize(trainable) (identity for full finetuning, base + LoRA otherwise).
  `log_probs`: the current lp if already known (theta == theta_old: the stored ones,
  bitwise equal); otherwise one forward scan computes them. `steps`: the only stochastic
  steps of a mixed ODE-SDE rollout (int [k]): they alone get gradients, and the others'
  lp are 0 (as the rollout recorded them; an ODE step has no density).
  """
  params = materialize(trainable)
  lp = scorer.all_steps(params, batch) if log_probs is None else log_probs
  if steps is not None:
    lp = jnp.where(window_mask(steps, lp.shape[1])[None], lp, 0.0)
  (loss, metrics), g = jax.value_and_grad(loss_from_log_probs, has_aux=True)(lp, batch)
  if steps is None:
    steps, scale = select_steps(key, lp.shape[1], timestep_fraction, skip_last)
  else:
    scale = 1.0

  def body(acc, j):
    _, vjp = jax.vjp(lambda tr: scorer.step(materialize(tr), batch, j), trainable)
    (gj,) = vjp(jnp.take(g, j, axis=1) * scale)
    return jax.tree.map(jnp.add, acc, gj), None

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  grads, _ = jax.lax.scan(body, zeros, steps, unroll=unroll)
  return loss, metrics, grads


def separable_grads(scorer: StepScorer, materialize: Callable, trainable: Any, batch: dict,
                    step_loss: Callable, key, *, timestep_fraction: float = 1.0,
                    skip_last: int = 0, unroll=1, kl_coef: float = 0.0, ref_params=None,
                    steps: jax.Array | None = None):
  """(loss, metrics, grads) of mean over selected steps j of step_loss(lp_j [n], j, batch),
  plus kl_coef · mean_i KL_j(i) to the steps under ref_params when kl_coef > 0 (metrics
  then add "kl" and "policy_loss"). `steps` (int [k]): these steps instead of a random
  timestep_fraction of them (a mixed ODE-SDE rollout's stochastic ones)."""
  num = batch["latents"].shape[1] - 1
  if steps is None:
    steps, _ = select_steps(key, num, timestep_fraction, skip_last)
  if kl_coef and ref_params is None:
    raise ValueError("separable_grads: kl_coef > 0 needs the reference params (ref_params)")

  def step_terms(tr, j):
    if not kl_coef:
      return step_loss(scorer.step(materialize(tr), batch, j), j, batch)
    lp, kl = scorer.step_kl(materialize(tr), ref_params, batch, j)
    loss, m = step_loss(lp, j, batch)
    kl = jnp.mean(kl)
    return loss + kl_coef * kl, dict(m, kl=kl, policy_loss=loss)

  def body(acc, j):
    def f(tr):
      return step_terms(tr, j)

    (loss, metrics), gj = jax.value_and_grad(f, has_aux=True)(trainable)
    grads, tot_loss, tot_m = acc
    return (jax.tree.map(jnp.add, grads, gj), tot_loss + loss,
            jax.tree.map(jnp.add, tot_m, metrics)), None

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  m0 = jax.eval_shape(lambda: step_terms(trainable, 0)[1])
  m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
  (grads, loss, metrics), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), m0), steps,
                                           unroll=unroll)
  n = steps.shape[0]
  return (loss / n, jax.tree.map(lambda v: v / n, metrics),
          jax.tree.map(lambda v: v / n, grads))


def naive_coupled_grads(scorer: StepScorer, materialize: Callable, trainable: Any,
                        batch: dict, loss_from_log_probs: Callable):
  """The textbook version: one value_and_grad through all T steps (memory grows with T).

  Same value and gradient as `coupled_grads` with timestep_fraction=1; kept for tests and
  the memory benchmark (benchmarks/update_memory.py).
  """
  num = batch["latents"].shape[1] - 1

  def f(tr):
    params = materialize(tr)
    _, lp = jax.lax.scan(lambda c, j: (c, scorer.step(params, batch, j)), None,
                         jnp.arange(num))
    return loss_from_log_probs(lp.T, batch)

  (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(trainable)
  return loss, metrics, grads
