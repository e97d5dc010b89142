"""The reward interface of the online loop, weighted combinations, and the registry.

A reward maps generated images and their prompts to one score per sample:

    reward(images [B, H, W, 3] float32 in [-1, 1], prompts) -> scores [B] float32

`prompts` is a dict of per-sample arrays: "ids" [B] (prompt index in the world),
"tokens" [B, L], and for ShapesWorld "assignments" [B, A, C, K] (bool). A reward is
declared `differentiable` (a jax function of the images: reward backprop, ReNO) or not
(only its values are used: PRDP, DDPO, RAFT). `host` rewards run as numpy code outside
jit (e.g. real JPEG encoding); the others are jax functions and may be jitted.

Learned rewards with large frozen weights (CLIP towers) carry them in `params`, and
their `fn` takes them as a third argument: jitted code receives them as an argument,
`reward(images, prompts, params)`, instead of baking gigabytes of constants into the
executable (which closing over them would do).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Reward:
  name: str
  fn: Callable[[Any, Mapping[str, Any]], Any]
  differentiable: bool
  host: bool = False
  # Combined rewards keep their weighted terms, for per-term logging.
  terms: tuple[tuple[float, "Reward"], ...] = ()
  # Frozen weights: when not None, fn(images, prompts, params).
  params: Any = None
  # Per-term values for `parts` beyond the score itself (an ensemble's members, a shaped
  # reward's value before shaping): parts_fn(images, prompts, params) -> {name: scores},
  # computed in one pass with the score, which it includes under `name`.
  parts_fn: Callable[..., Mapping[str, Any]] | None = None
  # Dense (process) rewards: steps_fn(completions, targets) -> [(ends, rewards), ...], the
  # reward of each step of each completion (rft.rewards.dense).
  steps_fn: Callable[..., Any] | None = None

  def __call__(self, images, prompts, params=None):
    """Scores; ``params`` (e.g. traced inside jit) replaces ``self.params`` when given."""
    if self.params is None:
      return self.fn(images, prompts)
    return self.fn(images, prompts, self.params if params is None else params)

  def parts(self, images, prompts, params=None) -> dict:
    """{name: scores} of every term (just {name: scores} for a single reward)."""
    if not self.terms:
      if self.parts_fn is not None:
        return dict(self.parts_fn(images, prompts, params))
      return {self.name: self(images, prompts, params)}
    out = {}
    for (_, r), p in zip(self.terms, params or (None,) * len(self.terms)):
      out.update(r.parts(images, prompts, p))
    return out


def check_finite_rewards(values, spec, term_names: Sequence[str] | None = None,
                         where: str = "") -> None:
  """FloatingPointError naming `config.reward` (and, for [N, R] per-term values with
  `term_names`, each term) when any reward is NaN or infinite: a bad reward stops the run
  where it appears instead of surfacing later as a NaN loss."""
  v = np.asarray(values)
  bad = ~np.isfinite(v)
  if not bad.any():
    return
  if term_names is not None and v.ndim == 2:
    detail = "; ".join(f"term {n!r}: {int(bad[:, j].sum())} of {len(v)} samples"
                       for j, n in enumerate(term_names) if bad[:, j].any())
  else:
    detail = f"{int(bad.sum())} of {v.size} samples"
  raise FloatingPointError(f"config.reward={spec!r} gave non-finite rewards"
                           f"{' ' + where if where else ''} ({detail})")


def combine(terms: Sequence[tuple[float, Reward]], name: str = "combined") -> Reward:
  """sum_i w_i * r_i(images, prompts); differentiable iff all terms are, host iff any is."""
  terms = tuple((float(w), r) for w, r in terms)
  if not terms:
    raise ValueError("combine: no reward terms given")
  if len(terms) == 1 and terms[0][0] == 1.0:
    return terms[0][1]
  host = any(r.host for _, r in terms)
  params = (tuple(r.params for _, r in terms)
            if any(r.params is not None for _, r in terms) else None)

  def fn(images, prompts, params=None):
    ps = params or (None,) * len(terms)
    if host:
      return sum(np.float32(w) * np.asarray(r(np.asarray(images), prompts, p), np.float32)
                 for (w, r), p in zip(terms, ps))
    return sum(w * jnp.asarray(r(images, prompts, p), jnp.float32)
               for (w, r), p in zip(terms, ps))

  return Reward(name, fn, differentiable=all(r.differentiable for _, r in terms), host=host,
                terms=terms, params=params)


# name -> factory(**kwargs) -> Reward. Modules register themselves on import.
REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str):
  def deco(factory):
    REGISTRY[name] = factory
    return factory
  return deco


def parse_spec(spec: str | Mapping[str, float]) -> dict[str, float]:
  """"a:1.0,b:0.5" (or "a", weight 1) or a {name: weight} mapping -> {name: weight}.

  Terms with weight 0 are dropped. A malformed term is an error naming it.
  """
  if not isinstance(spec, str):
    items = dict(spec).items()
  else:
    items = []
    for term in filter(None, (t.strip() for t in spec.split(","))):
      name, _, w = term.partition(":")
      try:
        items.append((name.strip(), float(w) if w else 1.0))
      except ValueError:
        raise ValueError(f"bad reward term {term!r} in {spec!r}; expected name[:weight]") from None
  bad = [f"{name}:{w}" for name, w in items if not math.isfinite(float(w))]
  if bad:
    raise ValueError(f"config.reward={spec!r}: weight(s) {bad} are not finite numbers")
  out = {name: float(w) for name, w in items if float(w) != 0.0}
  if not out:
    raise ValueError(f"reward spec {spec!r} has no term with a nonzero weight")
  return out


def build_term(name: str, options: Mapping[str, Any] | None = None,
               kwargs: Mapping[str, Any] | None = None, *,
               where: str | None = None, origin: str = "config.reward") -> Reward:
  """One registered reward: factory ``name`` called with the shared ``kwargs`` it accepts
  and its own ``options``, then shaped when the options ask for it (``shaping``,
  ``shaping_reference``, ``shaping_k``: rft.rewards.shaping.apply).

  ``where`` is the config key the options live under (default
  "config.reward_options.<name>") and ``origin`` the key that named the reward; errors
  name them. A factory with a ``shared_kwargs`` parameter (a reward built of other
  rewards, e.g. "ensemble") receives ``kwargs`` whole, to pass on to its members.
  """
  import inspect

  from rft.rewards import ensure_registered, shaping
  ensure_registered()
  where = where or f"config.reward_options.{name}"
  if name not in REGISTRY:
    raise ValueError(f"unknown reward {name!r} in {origin}; known: {sorted(REGISTRY)}")
  factory = REGISTRY[name]
  accepted = {k for k in inspect.signature(factory).parameters if k != "shared_kwargs"}
  own, shaping_options = shaping.split_options(dict(options or {}))
  bad = [k for k in own if k not in accepted]
  if bad:
    raise ValueError(f"{where}: unknown option(s) {bad}; the {name!r} reward takes "
                     f"{sorted(accepted | set(shaping.SHAPING_KEYS))}")
  kwargs = dict(kwargs or {})
  args = {k: v for k, v in kwargs.items() if k in accepted}
  args.update(own)
  if "shared_kwargs" in inspect.signature(factory).parameters:
    args["shared_kwargs"] = kwargs
  from rft.weights import io  # pylint: disable=g-import-not-at-top
  key = where[len("config."):] if where.startswith("config.") else where
  with io.pickle_key(f"{key}.allow_pickle"):  # refusals name the key
    reward = factory(**args)
  return shaping.apply(reward, shaping_options, where)


def build(weights: str | Mapping[str, float], options: Mapping[str, Mapping] | None = None,
          **kwargs) -> Reward:
  """A combined reward from "name:weight,..." or {name: weight}, e.g.
  "shapes_alignment" or "pickscore:10,hpsv2:2,aesthetic:0.05".

  kwargs (e.g. scorer_dir, prompt_texts) go to each factory that accepts them;
  ``options[name]`` (config.reward_options) go to that reward's factory only, e.g.
  {"hpsv2": {"weights_file": ".../HPS_v2.1_compressed.pt", "allow_pickle": True}}, or
  shape it: {"shapes_alignment_log": {"shaping": "par", "shaping_reference": -1.0}}
  (rft.rewards.shaping). An unknown reward name or an option its factory does not take is
  an error naming it. "ensemble" combines several reward models (rft.rewards.ensemble).
  """
  options = {k: dict(v) for k, v in dict(options or {}).items()}
  spec = parse_spec(weights)
  for name in options:
    if name not in spec:
      raise ValueError(f"config.reward_options has options for {name!r}, which is not a term "
                       f"of config.reward {weights!r}")
  return combine([(w, build_term(name, options.get(name), kwargs))
                  for name, w in spec.items()])
