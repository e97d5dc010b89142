"""Image grids of samples: every caption shown whole, with a note per tile.

* :func:`image_grid` tiles images (float in [-1, 1] or [0, 1], or uint8) with their
  captions wrapped to the tile width (never cut) and an optional note per tile, e.g. the
  reward and the evaluator's verdict (:func:`sample_note`, coloured by
  :func:`note_color`); :func:`samples_grid` is the form the trainers use.
* :func:`pick_samples` chooses which samples a grid shows: round-robin over the groups
  (caption families), so a grid of held-out samples shows the relation captions too and
  not only the first ids.
* :func:`shown_samples` / :func:`sample_grid` / :func:`before_after_grid`: an
  evaluation's grid and the final before / after grid of the same prompts and noise;
  :func:`save_samples` / :func:`load_samples` keep the shown samples in the workdir.
* :func:`save_image` writes a uint8 grid as PNG through rft.paths (local or gs://).

The TensorBoard writer (rft.metrics) logs these grids as images.
"""

from __future__ import annotations

import io
import math
from typing import Any, List, Optional, Sequence

import jax
import numpy as np

from rft import paths

__all__ = ["image_grid", "samples_grid", "to_uint8_images", "wrap_caption", "pick_samples",
           "sample_note", "note_color", "grid_scale", "save_image", "shown_samples",
           "sample_grid", "before_after_grid", "save_samples", "load_samples", "GRID_SAMPLES"]

# Samples an evaluation's grid shows (a fixed pick over the caption families).
GRID_SAMPLES = 16



def _to_uint8_batch(images: Any) -> np.ndarray:
  arr = np.asarray(jax.device_get(images))
  if arr.ndim == 3:
    arr = arr[..., None]
  if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(
        f"images must be [N, H, W, C] with C in (1, 3, 4), got {arr.shape}")
  if arr.dtype != np.uint8:
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0)
    arr = np.round((np.clip(arr, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  elif arr.shape[-1] == 4:
    arr = arr[..., :3]
  return arr


def to_uint8_images(images: Any) -> np.ndarray:
  """[N, H, W, C] float in [-1, 1] or uint8 (C in 1, 3, 4) -> uint8 [N, H, W, 3]."""
  return _to_uint8_batch(images)


def _font_and_measure():
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  font = ImageFont.load_default()
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

  def measure(s: str) -> int:
    left, _, right, _ = probe.textbbox((0, 0), s, font=font)
    return right - left

  _, top, _, bottom = probe.textbbox((0, 0), "Ag|", font=font)
  return font, measure, bottom - min(top, 0) + 1


def _wrap_text(text: str, width_px: int, measure, max_lines: Optional[int] = None
               ) -> List[str]:
  """Greedy word wrap by rendered width; a word wider than a line is split. With
  `max_lines`, a longer text is cut to that many lines, the last ending in '..'."""
  lines: List[str] = []
  cur = ""
  for word in text.split():
    cand = word if not cur else f"{cur} {word}"
    if measure(cand) <= width_px:
      cur = cand
      continue
    if cur:
      lines.append(cur)
    cur = ""
    while measure(word) > width_px and len(word) > 1:
      # Longest prefix that fits (at least one character).
      k = len(word) - 1
      while k > 1 and measure(word[:k]) > width_px:
        k -= 1
      lines.append(word[:k])
      word = word[k:]
    cur = word
  if cur:
    lines.append(cur)
  if max_lines and len(lines) > max_lines:
    last = lines[max_lines - 1]
    while last and measure(last + "..") > width_px:
      last = last[:-1]
    lines = lines[:max_lines - 1] + [last + ".."]
  return lines


def wrap_caption(text: str, width_px: int) -> List[str]:
  """The lines :func:`image_grid` draws `text` as under a tile `width_px` wide (the
  whole text, wrapped at spaces)."""
  _, measure, _ = _font_and_measure()
  return _wrap_text(str(text), width_px, measure)


def sample_note(reward: Optional[float] = None, aligned: Optional[bool] = None) -> str:
  """The text under a sample: ``"reward 0.412\\naligned"`` (or ``"not aligned"``); a
  part that is None is left out."""
  parts = []
  if reward is not None:
    parts.append(f"reward {float(reward):.3f}")
  if aligned is not None:
    parts.append("aligned" if bool(aligned) else "not aligned")
  return "\n".join(parts)


ALIGNED_COLOR, NOT_ALIGNED_COLOR = (0, 128, 0), (192, 0, 0)


def note_color(aligned: Optional[bool]):
  """Green for an aligned sample, red for one that is not, black without a verdict."""
  if aligned is None:
    return (0, 0, 0)
  return ALIGNED_COLOR if bool(aligned) else NOT_ALIGNED_COLOR


def grid_scale(image_width: int, min_tile: int = 96) -> int:
  """Nearest-neighbour upscaling for tiles at least `min_tile` pixels wide (a 16-pixel
  ShapesWorld image: 6; a 512-pixel one: 1), so a caption line holds a few words."""
  return max(1, -(-int(min_tile) // max(int(image_width), 1)))


def image_grid(images: Any, captions: Optional[Sequence[str]] = None,
               ncols: int = 8, scale: int = 4, *, max_caption_lines: Optional[int] = None,
               gap: int = 2, notes: Optional[Sequence[str]] = None,
               note_colors: Optional[Sequence[Any]] = None) -> np.ndarray:
  """Tiles images into one uint8 [H', W', 3] grid, text under each tile.

  Args:
    images: [N, H, W, C] float in [-1, 1] or uint8 (C in 1, 3, 4).
    captions: optional N strings drawn in small black text below each image, wrapped
      to the tile width (whole, unless ``max_caption_lines`` cuts them).
    ncols: tiles per row (fewer if N < ncols).
    scale: nearest-neighbour upscaling factor of each image.
    gap: pixels between tiles and around the border (white).
    notes: optional N strings drawn under the caption (lines split at '\\n', each
      wrapped), e.g. :func:`sample_note`'s reward and verdict, in ``note_colors[i]``
      (RGB; default black).

  Layout: tile (r, c) has its image at
  ``y = gap + r * (H*scale + text_h + gap)``, ``x = gap + c * (W*scale + gap)``
  where ``text_h`` is the height of the longest text under a tile (0 without text).
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  arr = _to_uint8_batch(images)
  n, h, w, _ = arr.shape
  if n == 0:
    raise ValueError("image_grid needs at least one image")
  for name, texts in (("captions", captions), ("notes", notes), ("note_colors", note_colors)):
    if texts is not None and len(texts) != n:
      raise ValueError(f"got {len(texts)} {name} for {n} images")
  scale = max(int(scale), 1)
  ncols = max(1, min(int(ncols), n))
  nrows = math.ceil(n / ncols)
  th, tw = h * scale, w * scale
  tiles = arr.repeat(scale, axis=1).repeat(scale, axis=2)

  font, measure, line_h = _font_and_measure()
  # Per tile: (lines, colour) pairs, the caption's then the note's.
  texts: List[List[tuple]] = [[] for _ in range(n)]
  for i in range(n):
    if captions is not None:
      texts[i] += [(line, (0, 0, 0)) for line in
                   _wrap_text(str(captions[i]), tw, measure, max_caption_lines)]
    if notes is not None:
      color = tuple(note_colors[i]) if note_colors is not None else (0, 0, 0)
      for part in str(notes[i]).split("\n"):
        texts[i] += [(line, color) for line in _wrap_text(part, tw, measure)]
  nlines = max(len(t) for t in texts)
  text_h = nlines * line_h + (1 if nlines else 0)

  gh = gap + nrows * (th + text_h + gap)
  gw = gap + ncols * (tw + gap)
  grid = np.full((gh, gw, 3), 255, np.uint8)
  if nlines:
    pil = Image.fromarray(grid)
    draw = ImageDraw.Draw(pil)
    for i, lines in enumerate(texts):
      r, c = divmod(i, ncols)
      y, x = gap + r * (th + text_h + gap) + th + 1, gap + c * (tw + gap)
      for j, (line, color) in enumerate(lines):
        draw.text((x, y + j * line_h), line, fill=color, font=font)
    grid = np.array(pil)
  # Images last: text never spills onto them.
  for i in range(n):
    r, c = divmod(i, ncols)
    y, x = gap + r * (th + text_h + gap), gap + c * (tw + gap)
    grid[y:y + th, x:x + tw] = tiles[i]
  return grid


def samples_grid(images: Any, captions: Sequence[str], rewards: Optional[Sequence] = None,
                 aligned: Optional[Sequence] = None, labels: Optional[Sequence[str]] = None,
                 ncols: int = 8) -> np.ndarray:
  """A grid of generated samples: each image with its whole caption, then its label
  (e.g. "epoch 0"), its reward and the evaluator's verdict (:func:`sample_note`; green
  when aligned, red when not), tiles upscaled to about 96 pixels (:func:`grid_scale`).
  `rewards`, `aligned`, `labels` (or their entries) may be None: left out."""
  arr = to_uint8_images(images)
  n = len(arr)
  rewards = [None] * n if rewards is None else list(rewards)
  aligned = [None] * n if aligned is None else list(aligned)
  labels = [""] * n if labels is None else list(labels)
  notes = ["\n".join(x for x in (label, sample_note(r, a)) if x)
           for label, r, a in zip(labels, rewards, aligned)]
  return image_grid(arr, list(captions), ncols=ncols, scale=grid_scale(arr.shape[2]),
                    notes=notes, note_colors=[note_color(a) for a in aligned])


def pick_samples(ids: Sequence[int], groups: Optional[Sequence[Any]] = None, k: int = 16,
                 seed: int = 0) -> np.ndarray:
  """Up to `k` positions into `ids` for a sample grid: a fixed, seeded pick spread over
  every group present (e.g. the caption families single / count / and / relation).

  The groups take turns, in order of first appearance: each turn adds, from that
  group, a position of an id not shown yet (in a seeded random order), so every group
  present gets ceil or floor of k / #groups places when it has enough distinct ids;
  repeated ids fill what is left. `groups` None: one group. The same (ids, groups, k,
  seed) always gives the same positions, so grids of successive evaluations show the
  same prompts (with the same initial noise when the evaluation's key is fixed).
  """
  ids = np.asarray(ids)
  n = len(ids)
  groups = np.zeros(n, np.int64) if groups is None else np.asarray(groups)
  if len(groups) != n:
    raise ValueError(f"got {len(groups)} groups for {n} ids")
  rng = np.random.default_rng(seed)
  order = rng.permutation(n)
  _, first = np.unique(groups, return_index=True)
  names = groups[np.sort(first)]
  queues = {i: [p for p in order if groups[p] == g] for i, g in enumerate(names)}
  chosen: List[int] = []
  shown: set = set()
  while len(chosen) < min(k, n):
    added = False
    for i in range(len(names)):
      if len(chosen) >= min(k, n):
        break
      q = queues[i]
      j = next((t for t, p in enumerate(q) if ids[p] not in shown), None)
      if j is None:
        continue
      p = q.pop(j)
      chosen.append(int(p))
      shown.add(ids[p])
      added = True
    if not added:  # every distinct id shown: repeats, in the seeded order
      rest = [int(p) for p in order if int(p) not in set(chosen)]
      chosen += rest[:min(k, n) - len(chosen)]
  rank = {g: i for i, g in enumerate(names)}  # grouped in the grid, groups in order
  chosen.sort(key=lambda p: rank[groups[p]])
  return np.asarray(chosen, np.int64)


def save_image(path: str, grid: Any) -> None:
  """Saves a uint8 [H, W, 3] (or [H, W]) array as a PNG file, local or not (parents
  created; rft.paths.write_png)."""
  arr = np.asarray(jax.device_get(grid))
  if arr.dtype != np.uint8:
    raise ValueError(f"save_image expects uint8, got {arr.dtype}; "
                     "use image_grid() to convert")
  paths.write_png(path, arr)


def shown_samples(images, ids, rewards, aligned, families, k: int = GRID_SAMPLES,
                  seed: int = 0) -> dict:
  """The samples an evaluation's grid shows: a fixed, seeded pick of `k` spread over the
  caption `families` (pick_samples), as {"images": uint8 [k, H, W, 3], "ids",
  "rewards", "aligned" (None without an evaluator)}."""
  shown = pick_samples(ids, families, k, seed)
  return {"images": to_uint8_images(np.asarray(images)[shown]),
          "ids": np.asarray(ids)[shown], "rewards": np.asarray(rewards, np.float32)[shown],
          "aligned": None if aligned is None else np.asarray(aligned, bool)[shown]}


def sample_grid(samples: dict, texts) -> np.ndarray:
  """A grid of `samples` (shown_samples): each image with its whole caption, its reward
  and the evaluator's verdict (samples_grid)."""
  return samples_grid(samples["images"], [texts[i] for i in samples["ids"]],
                      samples["rewards"], samples["aligned"])


def before_after_grid(before: dict, after: dict, texts, epochs: tuple[int, int],
                      ncols: int = 8) -> np.ndarray:
  """The same prompts (and initial noise) before and after finetuning: rows of up to
  `ncols` samples of `before`, each followed by the row of the same samples of `after`,
  each labelled with its epoch, reward and verdict."""
  if list(before["ids"]) != list(after["ids"]):
    raise ValueError("before / after grids of different prompts")
  k = len(before["ids"])
  ncols = max(1, min(ncols, k))
  blank = np.full_like(before["images"][:1], 255)
  images, captions, rewards, aligned, labels = [], [], [], [], []
  for start in range(0, k, ncols):
    sl = slice(start, start + ncols)
    pad = ncols - len(before["ids"][sl])
    for src, epoch in ((before, epochs[0]), (after, epochs[1])):
      got = len(src["ids"][sl])
      images += list(src["images"][sl]) + [blank[0]] * pad
      captions += [texts[i] for i in src["ids"][sl]] + [""] * pad
      rewards += list(src["rewards"][sl]) + [None] * pad
      aligned += (list(src["aligned"][sl]) if src["aligned"] is not None
                  else [None] * got) + [None] * pad
      labels += [f"epoch {epoch}"] * got + [""] * pad
  return samples_grid(np.stack(images), captions, rewards, aligned, labels, ncols)


def save_samples(path: str, samples: dict) -> None:
  """Write shown_samples' dict as .npz (local or gs://), e.g. the epoch-0 samples a
  resumed run needs for its before / after grid."""
  buf = io.BytesIO()
  np.savez(buf, **{k: v for k, v in samples.items() if v is not None})
  paths.write_bytes(path, buf.getvalue())


def load_samples(path: str) -> dict | None:
  """save_samples' dict, or None when `path` does not exist."""
  if not paths.path(path).exists():
    return None
  with np.load(io.BytesIO(paths.path(path).read_bytes())) as f:
    out = {k: f[k] for k in f.files}
  out.setdefault("aligned", None)
  return out
