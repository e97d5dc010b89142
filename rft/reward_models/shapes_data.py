"""Preference pairs and ratings on ShapesWorld, labelled by ground truth.

A ShapesWorld scene is four cells, each empty (class 0) or one object (a colour, shape and
size; rft.data.shapes). Every caption has the set of scenes that satisfy it
(`Prompt.assignments`), so whether an image shows its caption is known exactly for a
*render*. Pairs are made from renders (random object offsets):

* chosen: a scene that satisfies the caption (`ShapesWorld.sample_scenes`);
* rejected: the same scene after one edit that makes it violate the caption, checked
  against the caption's assignments. The edit kinds are the category of the pair:
  "color", "shape" or "size" of one object changed; "position" (one object moved to an
  empty cell, or two objects swapped); "missing" (one object removed); "extra" (an object
  added in an empty cell). An edit that leaves the scene aligned (e.g. a size change for a
  caption that names no size) is not used; kinds are tried in random order.
* with probability `tie_fraction`, a tie: two independent renders of satisfying scenes
  (label 1/2);
* `label_noise` swaps chosen and rejected of a strict pair with that probability.

Ratings: a satisfying render (rating 1) or, with probability `wrong_fraction`, an edited
one (rating 0), flipped with probability `label_noise`.

A pair's inputs are (image, caption tokens) twice: float32 [N, 16, 16, 3] renders in
[-1, 1] and the world tokenizer's int32 [N, L] ids of the caption. Categories: the edit
and the caption's family (single / count / and / relation).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rft.data import shapes

EDITS = ("color", "shape", "size", "position", "missing", "extra")


@dataclasses.dataclass
class ShapesPairs:
  ids: np.ndarray  # [N] caption ids
  chosen: np.ndarray  # [N, NUM_CELLS] cell classes of the chosen scene
  rejected: np.ndarray  # [N, NUM_CELLS]
  label: np.ndarray  # [N] float32: 1 chosen preferred, 1/2 a tie
  margin: np.ndarray  # [N] float32 (0: no margins on this world)
  categories: list  # [N] dicts {"edit": ..., "family": ...}

  def __len__(self):
    return len(self.ids)


@dataclasses.dataclass
class ShapesRatings:
  ids: np.ndarray  # [N]
  cells: np.ndarray  # [N, NUM_CELLS]
  rating: np.ndarray  # [N] float32
  categories: list

  def __len__(self):
    return len(self.ids)


def aligned(cells: np.ndarray, assignments: np.ndarray) -> np.ndarray:
  """Bool [N]: scene cells [N, C] satisfies some assignment [N, A, C, K] (numpy twin of
  rft.rewards.shapes_alignment.is_aligned)."""
  cells = np.asarray(cells)
  allowed = np.take_along_axis(assignments, cells[:, None, :, None], axis=-1)[..., 0]
  return allowed.all(-1).any(-1)


def _edits(cells: np.ndarray, kind: str, rng: np.random.Generator) -> list[np.ndarray]:
  """Candidate scenes: `cells` [C] after one edit of `kind` (possibly none)."""
  occ = np.flatnonzero(cells > 0)
  empty = np.flatnonzero(cells == 0)
  out = []
  for c in rng.permutation(occ):
    col, shp, siz = shapes.class_attributes(int(cells[c]))
    if kind in ("color", "shape", "size"):
      n = {"color": len(shapes.COLORS), "shape": len(shapes.SHAPES),
           "size": len(shapes.SIZES)}[kind]
      for v in rng.permutation(n):
        attrs = {"color": col, "shape": shp, "size": siz}
        if v == attrs[kind]:
          continue
        attrs[kind] = int(v)
        new = cells.copy()
        new[c] = shapes.class_index(attrs["color"], attrs["shape"], attrs["size"])
        out.append(new)
    elif kind == "position":
      for e in rng.permutation(empty):
        new = cells.copy()
        new[e], new[c] = cells[c], 0
        out.append(new)
      for o in rng.permutation(occ):
        if o != c and cells[o] != cells[c]:
          new = cells.copy()
          new[o], new[c] = cells[c], cells[o]
          out.append(new)
    elif kind == "missing":
      new = cells.copy()
      new[c] = 0
      out.append(new)
  if kind == "extra":
    for e in rng.permutation(empty):
      new = cells.copy()
      new[e] = rng.integers(1, shapes.NUM_CLASSES)
      out.append(new)
  return out


def violate(cells: np.ndarray, assignments: np.ndarray, rng: np.random.Generator,
            kinds: Sequence[str] = EDITS) -> tuple[np.ndarray, str]:
  """(edited scene [C], edit kind): one edit of `cells` [C] after which the scene no
  longer satisfies the caption whose assignments [A, C, K] are given. Kinds are tried in
  random order, and within a kind its candidate edits; "extra" (always possible: a
  satisfying scene never fills every cell) is the last resort."""
  for kind in [kinds[i] for i in rng.permutation(len(kinds))] + ["extra"]:
    for new in _edits(cells, kind, rng):
      if not aligned(new[None], assignments[None])[0]:
        return new, kind
  raise ValueError(f"no edit of scene {cells.tolist()} violates its caption")


def shapes_pairs(world: shapes.ShapesWorld, ids: Sequence[int], rng: np.random.Generator, *,
                 label_noise: float = 0.0, tie_fraction: float = 0.0) -> ShapesPairs:
  """One pair per caption id (see the module docstring)."""
  ids = np.asarray(ids, np.int64)
  n = len(ids)
  assign = world.assignments(ids)
  good = world.sample_scenes(rng, ids)
  tie = rng.random(n) < tie_fraction
  other = world.sample_scenes(rng, ids)
  bad = np.empty_like(good)
  cats = []
  for i in range(n):
    fam = shapes.FAMILIES[world.family_ids[ids[i]]]
    if tie[i]:
      bad[i] = other[i]
      cats.append({"edit": "tie", "family": fam})
    else:
      bad[i], kind = violate(good[i], assign[i], rng)
      cats.append({"edit": kind, "family": fam})
  flip = (rng.random(n) < label_noise) & ~tie
  chosen = np.where(flip[:, None], bad, good)
  rejected = np.where(flip[:, None], good, bad)
  return ShapesPairs(ids, chosen.astype(np.int32), rejected.astype(np.int32),
                     np.where(tie, 0.5, 1.0).astype(np.float32), np.zeros(n, np.float32),
                     cats)


def shapes_ratings(world: shapes.ShapesWorld, ids: Sequence[int], rng: np.random.Generator,
                   *, label_noise: float = 0.0, wrong_fraction: float = 0.5) -> ShapesRatings:
  """One rated scene per caption id: a satisfying one (1) or, with probability
  `wrong_fraction`, an edited one (0); ratings flipped with probability `label_noise`."""
  ids = np.asarray(ids, np.int64)
  n = len(ids)
  assign = world.assignments(ids)
  cells = world.sample_scenes(rng, ids)
  wrong = rng.random(n) < wrong_fraction
  cats = []
  for i in range(n):
    fam = shapes.FAMILIES[world.family_ids[ids[i]]]
    if wrong[i]:
      cells[i], kind = violate(cells[i], assign[i], rng)
    else:
      kind = "none"
    cats.append({"edit": kind, "family": fam})
  rating = np.where(wrong, 0.0, 1.0)
  rating = np.where(rng.random(n) < label_noise, 1.0 - rating, rating).astype(np.float32)
  return ShapesRatings(ids, cells.astype(np.int32), rating, cats)

