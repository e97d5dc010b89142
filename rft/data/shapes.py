"""ShapesWorld: a procedurally rendered text-to-image world that runs on a CPU.

An image is a 2x2 grid of cells (16x16 pixels, 8x8 per cell). Each cell is empty or
holds one object with a colour, a shape and a size, drawn with anti-aliasing at a
jittered position inside its cell. A caption comes from a small grammar:

  single    "a [small|large] red circle [at the top left]"
  count     "two blue squares", "three green crosses"
  and       "a red circle and a blue square"
  relation  "a red circle above|below|to the left of|to the right of a blue square"

Every caption is compiled to a list of *assignments*: for each cell, the set of cell
classes it may hold (class 0 = empty, 1 + (colour*S + shape)*2 + size otherwise).
A scene satisfies a caption iff it matches one assignment in every cell; the scenes
that satisfy a caption contain exactly the objects it names. The same compiled form
serves three purposes, so they can never disagree:
  * sampling a scene for a caption (pick an assignment, then a class per cell),
  * checking predicted scenes (evaluator alignment),
  * the differentiable probability that a classifier's per-cell distribution
    satisfies the caption (the alignment reward): P = sum_a prod_c p_c(A_a,c).
Distinct assignments describe disjoint events, so P is exact under independent cells.

Held-out split: prompts whose *combination* of attributes is held out -- the pairing
of two objects (and/relation prompts), an object at a position, a count of an
object -- never appear in training, while every single attribute does.
"""
from __future__ import annotations

import dataclasses
import itertools
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
COLOR_RGB = np.array(
    [
        (1.0, 0.15, 0.15),
        (0.15, 0.85, 0.2),
        (0.2, 0.35, 1.0),
        (1.0, 0.9, 0.1),
        (1.0, 0.2, 0.9),
        (0.1, 0.9, 0.95),
    ],
    np.float32,
)
SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS = ("circles", "squares", "triangles", "crosses")
SIZES = ("small", "large")
SIZE_EXTENT = (4.5, 7.0)  # object extent in pixels (cell is 8 pixels)
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
RELATIONS = ("above", "below", "to the left of", "to the right of")
COUNTS = {2: "two", 3: "three"}
FAMILIES = ("single", "count", "and", "relation")

GRID = 2  # cells per side
NUM_CELLS = GRID * GRID
CELL = 8  # pixels per cell side
IMAGE_SIZE = GRID * CELL
NUM_OBJECT_CLASSES = len(COLORS) * len(SHAPES) * len(SIZES)
NUM_CLASSES = 1 + NUM_OBJECT_CLASSES  # class 0 is "empty"
MAX_ASSIGNMENTS = 12  # ordered pairs of distinct cells: 4 * 3


def class_index(color: int, shape: int, size: int) -> int:
  return 1 + (color * len(SHAPES) + shape) * len(SIZES) + size


def class_attributes(k: int) -> tuple[int, int, int]:
  """Inverse of class_index: (colour, shape, size) of an object class k >= 1."""
  k -= 1
  return k // (len(SHAPES) * len(SIZES)), (k // len(SIZES)) % len(SHAPES), k % len(SIZES)


def _relation_holds(rel: int, a: int, b: int) -> bool:
  ra, ca = divmod(a, GRID)
  rb, cb = divmod(b, GRID)
  return (ra < rb, ra > rb, ca < cb, ca > cb)[rel]


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
  color: int
  shape: int
  size: int | None = None  # None: any size

  def classes(self) -> list[int]:
    sizes = range(len(SIZES)) if self.size is None else [self.size]
    return [class_index(self.color, self.shape, s) for s in sizes]

  def words(self) -> str:
    size = "" if self.size is None else SIZES[self.size] + " "
    return f"{size}{COLORS[self.color]} {SHAPES[self.shape]}"


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A caption of the grammar with its structure."""

  family: str
  objects: tuple[ObjectSpec, ...]
  position: int | None = None  # single: cell index
  count: int = 1  # count family: number of identical objects
  relation: int | None = None  # relation family: index into RELATIONS

  @property
  def text(self) -> str:
    if self.family == "single":
      pos = "" if self.position is None else f" at the {POSITIONS[self.position]}"
      return f"a {self.objects[0].words()}{pos}"
    if self.family == "count":
      o = self.objects[0]
      return f"{COUNTS[self.count]} {COLORS[o.color]} {SHAPE_PLURALS[o.shape]}"
    if self.family == "and":
      return f"a {self.objects[0].words()} and a {self.objects[1].words()}"
    return f"a {self.objects[0].words()} {RELATIONS[self.relation]} a {self.objects[1].words()}"

  @property
  def combination(self) -> tuple:
    """The attribute combination the held-out split is keyed on (None: always train)."""
    o = self.objects
    if self.family == "single":
      return None if self.position is None else ("at", o[0].color, o[0].shape, self.position)
    if self.family == "count":
      return ("count", self.count, o[0].color, o[0].shape)
    pair = sorted([(o[0].color, o[0].shape), (o[1].color, o[1].shape)])
    return ("pair", *pair[0], *pair[1])

  def assignments(self) -> np.ndarray:
    """Bool [MAX_ASSIGNMENTS, NUM_CELLS, NUM_CLASSES]: allowed classes per cell.

    Rows beyond the number of valid assignments are all False (probability 0).
    """
    placements: list[tuple[tuple[int, ObjectSpec], ...]] = []
    cells = range(NUM_CELLS)
    if self.family == "single":
      for c in cells if self.position is None else [self.position]:
        placements.append(((c, self.objects[0]),))
    elif self.family == "count":
      for combo in itertools.combinations(cells, self.count):  # identical objects
        placements.append(tuple((c, self.objects[0]) for c in combo))
    else:
      for a, b in itertools.permutations(cells, 2):
        if self.family == "and" or _relation_holds(self.relation, a, b):
          placements.append(((a, self.objects[0]), (b, self.objects[1])))
    out = np.zeros((MAX_ASSIGNMENTS, NUM_CELLS, NUM_CLASSES), bool)
    for i, placement in enumerate(placements):
      out[i, :, 0] = True
      for c, spec in placement:
        out[i, c, 0] = False
        out[i, c, spec.classes()] = True
    return out


def enumerate_prompts() -> list[Prompt]:
  """Every caption of the grammar (3168 of them), in a fixed order."""
  objs = [(c, s) for c in range(len(COLORS)) for s in range(len(SHAPES))]
  out = []
  for c, s in objs:
    for size in (None, *range(len(SIZES))):
      for pos in (None, *range(NUM_CELLS)):
        out.append(Prompt("single", (ObjectSpec(c, s, size),), position=pos))
  for n in COUNTS:
    for c, s in objs:
      out.append(Prompt("count", (ObjectSpec(c, s),), count=n))
  for (c1, s1), (c2, s2) in itertools.permutations(objs, 2):
    pair = (ObjectSpec(c1, s1), ObjectSpec(c2, s2))
    out.append(Prompt("and", pair))
    for r in range(len(RELATIONS)):
      out.append(Prompt("relation", pair, relation=r))
  return out


def _held_out(combination: tuple | None, fraction: float, seed: int) -> bool:
  if combination is None:
    return False
  h = zlib.crc32(repr((seed, combination)).encode()) / 2**32
  return h < fraction


class ShapesWorld:
  """The prompt set, its train/held-out split, scene sampling and rendering.

  Deterministic given `seed` (split) and the rng passed to sampling functions.
  """

  def __init__(self, holdout_fraction: float = 0.2, split_seed: int = 0,
               family_weights: Sequence[float] = (0.35, 0.15, 0.15, 0.35)):
    if len(family_weights) != len(FAMILIES):
      raise ValueError(f"family_weights needs {len(FAMILIES)} entries {FAMILIES}, got {family_weights}")
    self.prompts = enumerate_prompts()
    self.texts = [p.text for p in self.prompts]
    self.index = {t: i for i, t in enumerate(self.texts)}
    held = np.array([_held_out(p.combination, holdout_fraction, split_seed) for p in self.prompts])
    fam = np.array([FAMILIES.index(p.family) for p in self.prompts])
    self.family_ids = fam
    self.split_ids = {"train": np.flatnonzero(~held), "heldout": np.flatnonzero(held)}
    w = np.asarray(family_weights, np.float64)
    self.family_weights = w / w.sum()
    # Per split: the families present, their prompt pools and renormalised weights.
    self._families = {}
    for split, ids in self.split_ids.items():
      present = [f for f in range(len(FAMILIES)) if np.any(fam[ids] == f)]
      pw = self.family_weights[present]
      self._families[split] = (present, [ids[fam[ids] == f] for f in present], pw / pw.sum())
    self._assign_cache: dict[int, np.ndarray] = {}

  # -- prompts ---------------------------------------------------------------
  def prompt_ids(self, texts: Sequence[str]) -> np.ndarray:
    try:
      return np.array([self.index[t] for t in texts], np.int32)
    except KeyError as e:
      raise KeyError(f"not a ShapesWorld caption: {e.args[0]!r} (see rft.data.shapes grammar)") from None

  def assignments(self, ids: Sequence[int]) -> np.ndarray:
    """Bool [len(ids), MAX_ASSIGNMENTS, NUM_CELLS, NUM_CLASSES]."""
    out = []
    for i in np.asarray(ids).reshape(-1):
      i = int(i)
      if i not in self._assign_cache:
        self._assign_cache[i] = self.prompts[i].assignments()
      out.append(self._assign_cache[i])
    return np.stack(out)

  def sample_prompt_ids(self, rng: np.random.Generator, n: int, split: str = "train") -> np.ndarray:
    """n prompt ids of `split`: a family by family_weights, then a prompt uniformly."""
    present, pools, w = self._families[_check_split(split)]
    chosen = rng.choice(present, size=n, p=w)
    out = np.empty(n, np.int64)
    for f, pool in zip(present, pools):
      sel = chosen == f
      out[sel] = rng.choice(pool, size=int(sel.sum()))
    return out

  def eval_prompt_ids(self, split: str, n: int, seed: int = 1234) -> np.ndarray:
    """A fixed evaluation set of n distinct prompts of `split` (same family mix)."""
    _, pools, w = self._families[_check_split(split)]
    rng = np.random.default_rng(seed)
    if n > len(self.split_ids[split]):
      raise ValueError(f"asked for {n} distinct {split} prompts, the split has "
                       f"{len(self.split_ids[split])}")
    quota = np.minimum(np.floor(w * n).astype(int), [len(p) for p in pools])
    while quota.sum() < n:  # give what small families cannot take to the others, by weight
      spare = np.array([len(p) for p in pools]) - quota
      quota[np.argmax(np.where(spare > 0, w, -1))] += 1
    out = []
    for pool, q in zip(pools, quota):
      out.extend(rng.choice(pool, size=q, replace=False))
    return np.array(sorted(out), np.int64)

  # -- scenes ----------------------------------------------------------------
  def sample_scenes(self, rng: np.random.Generator, ids: Sequence[int]) -> np.ndarray:
    """Cell classes int32 [N, NUM_CELLS] of random scenes satisfying each prompt."""
    masks = self.assignments(ids)
    out = np.zeros((len(masks), NUM_CELLS), np.int32)
    for n, m in enumerate(masks):
      valid = np.flatnonzero(m[:, 0].any(-1))  # padded rows allow nothing
      a = rng.choice(valid)
      for c in range(NUM_CELLS):
        out[n, c] = rng.choice(np.flatnonzero(m[a, c]))
    return out

  def sample(self, rng: np.random.Generator, n: int, split: str = "train"):
    """(images [n,16,16,3] in [-1,1], prompt ids [n], cells [n,4]) for training."""
    ids = self.sample_prompt_ids(rng, n, split)
    cells = self.sample_scenes(rng, ids)
    return render_np(cells, rng), ids, cells


def _check_split(split: str) -> str:
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  return split


def random_scenes(rng: np.random.Generator, n: int, empty_prob: float = 0.4) -> np.ndarray:
  """Unconstrained random scenes (each cell empty with empty_prob), at least one object."""
  cells = np.where(rng.random((n, NUM_CELLS)) < empty_prob, 0,
                   rng.integers(1, NUM_CLASSES, (n, NUM_CELLS)))
  none = ~(cells > 0).any(1)
  cells[none, rng.integers(0, NUM_CELLS, none.sum())] = rng.integers(1, NUM_CLASSES, none.sum())
  return cells.astype(np.int32)


_SS = 4  # supersampling factor for anti-aliasing


def sample_offsets(rng: np.random.Generator, cells: np.ndarray) -> np.ndarray:
  """Random object-centre offsets [N, NUM_CELLS, 2] (x, y), as far as each object fits."""
  extent = np.asarray(SIZE_EXTENT, np.float32)[np.maximum(np.asarray(cells) - 1, 0) % len(SIZES)]
  room = np.maximum((CELL - extent) / 2 - 0.25, 0.0)
  return (rng.uniform(-1, 1, (*extent.shape, 2)) * room[..., None]).astype(np.float32)


def render(cells, offsets=None):
  """Render cell classes [N, NUM_CELLS] to float32 images [N, 16, 16, 3] in [-1, 1].

  Pure jax.numpy (jit it, or call `render_np`). Shapes are drawn on a 4x supersampled
  grid and box-filtered (anti-aliasing); `offsets` [N, NUM_CELLS, 2] move each
  object's centre inside its cell (None: centred).
  """
  cells = jnp.asarray(cells, jnp.int32)
  n = cells.shape[0]
  k = jnp.maximum(cells - 1, 0)
  color = k // (len(SHAPES) * len(SIZES))
  shape = (k // len(SIZES)) % len(SHAPES)
  h = (jnp.asarray(SIZE_EXTENT, jnp.float32)[k % len(SIZES)] / 2)[..., None, None]
  rows, cols = np.divmod(np.arange(NUM_CELLS), GRID)
  cx = jnp.asarray(cols * CELL + CELL / 2, jnp.float32)[None]
  cy = jnp.asarray(rows * CELL + CELL / 2, jnp.float32)[None]
  if offsets is not None:
    cx = cx + offsets[..., 0]
    cy = cy + offsets[..., 1]
  g = (jnp.arange(IMAGE_SIZE * _SS, dtype=jnp.float32) + 0.5) / _SS
  dx = g[None, None, None, :] - cx[..., None, None]  # [N, C, 1, W]
  dy = g[None, None, :, None] - cy[..., None, None]  # [N, C, H, 1]
  ax, ay = jnp.abs(dx), jnp.abs(dy)
  bar = h / 3
  masks = jnp.stack([
      dx**2 + dy**2 <= h**2,  # circle
      (ax <= 0.85 * h) & (ay <= 0.85 * h),  # square
      (dy >= -h) & (dy <= h) & (ax <= (dy + h) / 2),  # triangle, apex up
      ((ax <= bar) & (ay <= h)) | ((ay <= bar) & (ax <= h)),  # cross
  ], axis=2)  # [N, C, S, H, W]
  onehot = jax.nn.one_hot(shape, len(SHAPES)) * (cells > 0)[..., None]  # [N, C, S]
  rgb = jnp.asarray(COLOR_RGB)[color]  # [N, C, 3]
  canvas = jnp.einsum("ncshw,ncs,ncd->nhwd", masks.astype(jnp.float32), onehot, rgb)
  img = canvas.reshape(n, IMAGE_SIZE, _SS, IMAGE_SIZE, _SS, 3).mean(axis=(2, 4))
  return img * 2.0 - 1.0


_render_jit = jax.jit(render)


def render_np(cells: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
  """Numpy convenience: render with random offsets from `rng` (None: centred)."""
  offsets = None if rng is None else sample_offsets(rng, cells)
  return np.asarray(_render_jit(np.asarray(cells, np.int32), offsets))


MAX_CAPTION_WORDS = 12


def tokenizer():
  """The word tokenizer of every ShapesWorld caption (vocab 31 incl. padding)."""
  from rft.data.tokenizer import WordTokenizer
  return WordTokenizer.from_texts((p.text for p in enumerate_prompts()), MAX_CAPTION_WORDS)
