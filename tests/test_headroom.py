"""rft.tools.headroom: caption classification, and each measurement end to end (tiny)."""
import numpy as np
import pytest

from rft.data import shapes
from rft.tools import headroom


def test_position_words_match_the_grammar():
  world = shapes.ShapesWorld()
  for text, fam in zip(world.texts, world.family_ids):
    name = shapes.FAMILIES[fam]
    if name == "relation":
      assert headroom.has_position(text), text
    elif name in ("count", "and"):
      assert not headroom.has_position(text), text
    else:  # single: with or without "at the <cell>"
      assert headroom.has_position(text) == (" at the " in text), text


@pytest.mark.slow  # two evaluations of the base model; the probes' pieces are tested below
def test_captions_and_supervised_run_and_add_up():
  out = headroom.main(["captions", "--train_prompts", "4", "--samples", "2"])
  assert out["captions"] == 4 and 0 <= out["alignment"] <= 1
  assert 0 <= out["ceiling_without_position_points"] <= 100
  sup = headroom.main(["supervised", "--train_prompts", "4", "--steps", "2", "--batch", "4",
                       "--trainable", "^unet/mid"])
  steps = [h["step"] for h in sup["history"]]
  assert steps == [0, 1, 2] and all(np.isfinite(h["alignment"]) for h in sup["history"])


def test_position_swap_probe():
  # Each swap is an involution without fixed points; "opposite" changes both words, "row"
  # only the first (top/bottom), "column" only the second (left/right).
  for name, swap in headroom.SWAPS.items():
    assert sorted(swap) == sorted(shapes.POSITIONS)
    for a, b in swap.items():
      assert swap[b] == a and a != b
      same = [x == y for x, y in zip(a.split(), b.split())]
      assert same == {"opposite": [False, False], "row": [False, True],
                      "column": [True, False]}[name], (name, a, b)
  out = headroom.main(["positions", "--samples", "2"])  # 8 captions
  assert sorted(out) == sorted(headroom.SWAPS)
  for v in out.values():
    assert sorted(v) == [850, 900, 950, 980] and all(np.isfinite(x) for x in v.values())
