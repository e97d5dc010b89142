"""What a run shows: TensorBoard hparams, learning rate, throughput and sample grids, and
the console (one line per evaluation, progress lines without carriage returns when the
output is not a terminal), checked on smoke runs and on the pieces by hand."""
import io
import json
import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rft import config as config_lib
from rft import image_grids, metrics, tb_events
from rft.data import shapes
from rft.train import diffusion_rl, loop, state as state_lib

# ------------------------------------------------------------------ pieces by hand


def test_lr_schedule_by_hand():
  lr = 3e-4
  const = state_lib.lr_schedule(lr, 10, warmup=4, schedule="constant")
  assert [float(const(c)) for c in range(6)] == pytest.approx(
      [0.0, lr / 4, lr / 2, 3 * lr / 4, lr, lr], rel=1e-6)
  assert float(state_lib.lr_schedule(lr, 10, 0, "constant")(0)) == pytest.approx(lr)
  # cosine: warmup 2, then cos decay to 0.05 lr at update 6.
  cos = state_lib.lr_schedule(lr, 6, warmup=2)
  end = 0.05 * lr
  want = [0.0, lr / 2, lr] + [end + (lr - end) * 0.5 * (1 + math.cos(math.pi * (c - 2) / 4))
                              for c in (3, 4, 5)]
  assert [float(cos(c)) for c in range(6)] == pytest.approx(want, rel=1e-5)


def test_apply_update_reports_the_lr_of_its_update_count():
  sched = state_lib.lr_schedule(1.0, 10, warmup=4, schedule="constant")
  tx = state_lib.make_optimizer(1.0, 10, 4, schedule="constant", name="sgd", b1=0.0)
  st = state_lib.TrainState.create({"w": jnp.ones(2)}, tx)
  step = jax.jit(lambda s: loop.apply_update(s, {"w": jnp.ones(2)}, tx, {}, lr=sched))
  lrs = []
  for _ in range(3):
    before = st.params["w"]
    st, m = step(st)
    lrs.append(float(m["lr"]))
    # SGD without momentum moves by exactly lr * grad: the reported lr is the one used.
    np.testing.assert_allclose(before - st.params["w"], lrs[-1], rtol=1e-6)
  assert lrs == pytest.approx([0.0, 0.25, 0.5])


def test_pick_covers_every_caption_family_of_each_split():
  world = shapes.ShapesWorld()
  for split in ("train", "heldout"):
    ids = world.eval_prompt_ids(split, 256)
    fams = world.family_ids[ids]
    present = set(fams.tolist())
    picked = image_grids.pick_samples(ids, fams, 16, seed=0)
    assert len(picked) == 16 and len(set(ids[picked].tolist())) == 16  # distinct prompts
    assert set(fams[picked].tolist()) == present, split
    assert len(present) >= 3  # the held-out split is mostly relations, not only singles
    # Every family gets its share: 16 / #families, rounded.
    counts = np.bincount(fams[picked], minlength=len(shapes.FAMILIES))[sorted(present)]
    assert counts.min() >= 16 // len(present)
    # Fixed: the same pick every time (grids of successive evaluations compare).
    np.testing.assert_array_equal(picked, image_grids.pick_samples(ids, fams, 16, seed=0))
  # The old grid (the first sorted ids) showed single-object captions only.
  ids = world.eval_prompt_ids("heldout", 256)
  assert set(world.family_ids[ids[:16]].tolist()) == {0}


def test_pick_repeats_only_when_the_prompts_run_out():
  ids = np.array([5, 5, 5, 7, 7, 9])
  picked = image_grids.pick_samples(ids, None, 4, seed=1)
  assert len(picked) == 4 and len(set(picked.tolist())) == 4
  assert set(ids[picked[:3]].tolist()) == {5, 7, 9}  # every prompt before a repeat
  assert len(image_grids.pick_samples(ids, None, 10)) == 6


def test_a_long_caption_is_wrapped_whole_not_cut():
  caption = "a yellow triangle to the right of a magenta triangle"  # the longest caption
  lines = image_grids.wrap_caption(caption, 64)
  assert len(lines) >= 4 and " ".join(lines) == caption  # every word, in order, no ".."
  # Drawn: text rows exist below the third line (the old grid cut captions at 3 lines).
  grid = image_grids.image_grid(np.zeros((1, 16, 16, 3), np.uint8), [caption], scale=4)
  _, _, line_h = image_grids._font_and_measure()
  band = grid[2 + 64 + 1 + 3 * line_h:, 2:2 + 64]
  assert band.size and band.min() < 128


def test_sample_note_and_its_colour_match_the_values():
  assert image_grids.sample_note(0.41237, True) == "reward 0.412\naligned"
  assert image_grids.sample_note(0.1, False) == "reward 0.100\nnot aligned"
  assert image_grids.sample_note(None, None) == ""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
  ids = np.array([3, 1, 4, 1, 5, 9])
  rewards = np.array([0.9, 0.2, 0.35, 0.7, 0.05, 0.6], np.float32)
  aligned = np.array([True, False, True, True, False, True])
  shown = image_grids.shown_samples(images, ids, rewards, aligned,
                                     ["single", "count", "and", "relation", "and", "count"],
                                     k=4)
  pos = image_grids.pick_samples(ids, ["single", "count", "and", "relation", "and", "count"], 4)
  np.testing.assert_array_equal(shown["ids"], ids[pos])
  np.testing.assert_array_equal(shown["rewards"], rewards[pos])
  np.testing.assert_array_equal(shown["aligned"], aligned[pos])
  np.testing.assert_array_equal(shown["images"], images[pos])
  texts = {i: f"caption {i}" for i in ids}
  grid = image_grids.sample_grid(shown, texts)
  # Under each tile, the note's colour is the verdict's: green text under aligned
  # tiles, red under the others.
  tw = 16 * image_grids.grid_scale(16)
  for j, ok in enumerate(shown["aligned"]):
    x = 2 + j * (tw + 2)
    band = grid[2 + tw:, x:x + tw].reshape(-1, 3).astype(int)
    greenish = np.any((band[:, 1] > 100) & (band[:, 0] < 60))
    reddish = np.any((band[:, 0] > 150) & (band[:, 1] < 60))
    assert (greenish, reddish) == ((True, False) if ok else (False, True)), j


def test_before_after_grid_pairs_rows_of_the_same_prompts():
  rng = np.random.default_rng(1)
  mk = lambda: {"images": rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8),
                "ids": np.array([0, 1, 2]), "rewards": rng.random(3),
                "aligned": np.array([True, False, True])}
  before, after = mk(), mk()
  grid = image_grids.before_after_grid(before, after, ["a", "b", "c"], (0, 40))
  tw = 16 * image_grids.grid_scale(16)
  top = grid[2:2 + tw, 2:2 + tw]
  np.testing.assert_array_equal(top, before["images"][0].repeat(6, 0).repeat(6, 1))
  # The after row starts one tile row (image + text) lower, same column.
  rows = np.flatnonzero(np.all(grid[:, 2:2 + tw] == after["images"][0].repeat(6, 1)[0], 1))
  assert len(rows) and rows[0] > tw
  with pytest.raises(ValueError, match="different prompts"):
    image_grids.before_after_grid(before, dict(after, ids=np.array([0, 1, 3])), "abcd",
                                   (0, 1))


def test_eval_line_by_hand():
  m = {"train/config_reward": 0.6121, "heldout/config_reward": 0.4804,
       "train/alignment": 0.703, "heldout/alignment": 0.4812, "train/objects_present": 1.0}
  assert loop.eval_line("epoch", 10, m, diffusion_rl.EVAL_LINE) == (
      "epoch 10  reward seen 0.612 unseen 0.480  alignment seen 70.3 % unseen 48.1 %")
  assert loop.eval_line("step", 3, {"train/accuracy_greedy": 0.5}, (
      ("accuracy greedy", "accuracy_greedy", "%"), ("sampled", "accuracy_sampled", "%"))
                        ) == "step 3  accuracy greedy seen 50.0 %"


class _FakeTerminal(io.StringIO):
  def isatty(self):
    return True


def test_on_a_terminal_log_lines_go_above_the_bar():
  out = _FakeTerminal()
  handler = logging.StreamHandler(out)
  handler.setFormatter(logging.Formatter("%(message)s"))
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    bar = metrics.ProgressBar(4, desc="prdp", unit="epoch", disable=False, file=out,
                              mininterval=0)
    bar.update(1, loss=0.5)
    assert handler.stream is not out  # redirected while the bar is open
    logging.getLogger("x").warning("epoch 1  reward seen 0.5")
    bar.update(2, loss=0.25)
    bar.close()
    assert handler.stream is out  # and restored
  finally:
    root.removeHandler(handler)
  text = out.getvalue()
  assert "epoch/s" in text or "s/epoch" in text  # the unit is the loop's
  # The log line starts a line of its own: the bar was cleared ('\r') before it.
  i = text.index("epoch 1  reward seen 0.5")
  assert text[i - 1] in "\r\n", repr(text[max(0, i - 40):i + 30])
  line = text[i:].split("\n", 1)[0]
  assert line == "epoch 1  reward seen 0.5"
  assert "prdp" in text.split("epoch 1  reward seen 0.5")[1]  # the bar drawn again below


def test_without_a_terminal_plain_lines_and_no_carriage_returns(caplog):
  out = io.StringIO()
  caplog.set_level(logging.INFO)
  bar = metrics.ProgressBar(40, initial=10, desc="prdp", unit="epoch", disable=False,
                            file=out, line_every_secs=3600)
  for e in range(11, 41):
    bar.update(e, reward=0.5, loss=1e-3)
  bar.close()
  assert "\r" not in out.getvalue() and out.getvalue() == ""
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prdp:")]
  # The first update and the last one (the interval is an hour).
  assert [l.split(",")[0] for l in lines] == ["prdp: epoch 11/40 (28%)", "prdp: epoch 40/40 (100%)"]
  assert "s/epoch" in lines[0] and "left" in lines[0] and "reward=0.5" in lines[0]


# ------------------------------------------------------------------ smoke runs


def _console(p, workdir) -> list[str]:
  """The run's output lines, the workdir's path (its length is the caller's) as "WD"."""
  text = (p.stdout + p.stderr).replace(str(workdir), "WD")
  assert "\r" not in text  # no bar redraws in a log file
  return [l for l in text.split("\n") if l.strip()]


def _check_console(lines, unit, loop_name, evals, max_lines):
  assert len(lines) <= max_lines, "\n".join(lines)
  assert max(map(len, lines)) <= 200, max(lines, key=len)
  # One line per evaluation, each evaluation once, no metric dicts.
  for n in evals:
    ev = [l for l in lines if re.search(rf"\] {unit} {n}  ", l)]
    assert len(ev) == 1, (n, lines)
  assert not any("{'" in l or "[Hyperparameters]" in l for l in lines), lines
  # Progress lines name the loop's unit.
  prog = [l for l in lines if f"] {loop_name}: " in l]
  assert prog and all(f"{loop_name}: {unit} " in l for l in prog), prog
  other = {"epoch": "step", "step": "epoch"}[unit]
  assert not any(f"s/{other}" in l for l in prog)


# Two updates per epoch under a 4-update warmup: epoch 1 uses lr 0 and lr/4, epoch 2 lr/2
# and 3 lr/4 (train/lr is their mean). tests/test_online.py's PRDP smoke run uses these.
PRDP_SMOKE_ARGS = ("--config.warmup=4", "--config.updates_per_epoch=2")


def check_prdp_smoke(p, wd):
  """What the PRDP smoke run (configs/prdp.py:smoke + PRDP_SMOKE_ARGS) shows: called from
  tests/test_online.py's smoke test (one run for both)."""
  config = config_lib.load("prdp", "smoke")
  results = json.loads((wd / "results.json").read_text())

  # Console: 97 lines of up to 913 characters before (config dump, writer echo).
  lines = _console(p, wd)
  _check_console(lines, "epoch", "prdp", (0, 2), max_lines=10)
  assert "config configs/prdp.py:smoke, workdir WD (the whole config: config.json there)" \
      in lines[0]

  # Hyperparameters: the whole config, nested blocks included, and metric columns whose
  # last values are the final evaluation.
  hp = tb_events.read_hparams(str(wd))
  assert hp["hparams"]["objective.beta"] == pytest.approx(config.objective.beta)
  assert hp["hparams"]["sampler.num_steps"] == 3
  assert hp["hparams"]["finetune.trainable"] == config.finetune.trainable
  assert hp["hparams"]["mesh.data"] == -1 and hp["hparams"]["warmup"] == 4
  assert hp["hparams"]["sampler.clip_x0"] == 1.0
  assert {"eval/heldout/alignment", "eval/train/alignment", "eval/heldout/config_reward",
          "train/reward_mean"} <= set(hp["metrics"])
  scalars = tb_events.read_scalars(str(wd))
  for split in ("train", "heldout"):
    step, value = scalars[f"eval/{split}/alignment"][-1]
    assert step == 2 and value == pytest.approx(results["history"]["2"][f"{split}/alignment"])

  # Learning rate by hand, and throughput: 2 prompts x 4 samples per epoch.
  lr = config.lr
  assert [v for _, v in scalars["train/lr"]] == pytest.approx([lr / 8, 5 * lr / 8], rel=1e-6)
  for (_, sps), (_, secs) in zip(scalars["train/samples_per_sec"],
                                 scalars["train/epoch_seconds"]):
    assert sps * secs == pytest.approx(results["samples_per_epoch"], rel=1e-4)
  assert results["samples_per_epoch"] == 8

  # Sample grids: one tag per split (step = epoch) and the before / after at the end,
  # also as PNGs in the workdir.
  images = tb_events.read_images(str(wd))
  for split in ("train", "heldout"):
    assert [s for s, _ in images[f"samples/{split}"]] == [0, 2]
    assert [s for s, _ in images[f"samples/{split}/before_after"]] == [2]
    png = wd / "samples" / f"{split}_before_after.png"
    from PIL import Image
    np.testing.assert_array_equal(np.array(Image.open(png)),
                                  images[f"samples/{split}/before_after"][0][1])


def check_grpo_smoke(p, wd):
  """What the GRPO smoke run (configs/grpo.py:smoke) shows: called from
  tests/test_lm_rl.py's smoke test (one run for both)."""
  config = config_lib.load("grpo", "smoke")
  results = json.loads((wd / "results.json").read_text())
  _check_console(_console(p, wd), "step", "grpo:grpo", (0, 2), max_lines=10)

  hp = tb_events.read_hparams(str(wd))
  assert hp["hparams"]["objective.beta"] == pytest.approx(config.objective.beta)
  assert hp["hparams"]["sampling.max_new_tokens"] == config.sampling.max_new_tokens
  assert {"eval/heldout/accuracy_greedy", "train/reward_mean"} <= set(hp["metrics"])
  scalars = tb_events.read_scalars(str(wd))
  assert scalars["eval/heldout/accuracy_greedy"][-1] == (
      2, pytest.approx(results["history"]["2"]["heldout/accuracy_greedy"]))

  # Warmup of config.warmup updates, one update per step: lr 0, then lr / warmup.
  assert config.warmup > 2 and config.inner_iterations * config.minibatches == 1
  assert [v for _, v in scalars["train/lr"]] == pytest.approx(
      [0.0, config.lr / config.warmup], rel=1e-6)
  # Throughput: Q x G completions per step, rollout and whole step.
  completions = config.prompts_per_step * config.group_size
  for k in ("completions_per_sec_rollout", "completions_per_sec"):
    assert len(scalars[f"train/{k}"]) == 2
  for (_, c), (_, t) in zip(scalars["train/completions_per_sec_rollout"],
                            scalars["train/rollout_seconds"]):
    assert c * t == pytest.approx(completions, rel=1e-4)
  for (_, c), (_, t) in zip(scalars["train/completions_per_sec"], scalars["train/step_seconds"]):
    assert c * t == pytest.approx(completions, rel=1e-4)
  assert all(v > 0 for _, v in scalars["train/tokens_per_sec"])
  texts = tb_events.read_texts(str(wd))
  assert {"samples/train", "samples/heldout", "samples/rollouts"} <= set(texts)


def check_pretrain_smoke(p, wd):
  """What pretraining's smoke run (configs/pretrain_shapes.py:smoke) shows: called from
  tests/test_main.py's pretraining smoke test (one run for both)."""
  config = config_lib.load("pretrain_shapes", "smoke")
  _check_console(_console(p, wd), "step", "pretrain", (config.steps,), max_lines=10)
  hp = tb_events.read_hparams(str(wd))
  assert hp["hparams"]["model.unet.channels"] == str(config.model.unet.channels)
  assert hp["hparams"]["sampler.num_steps"] == config.sampler.num_steps
  assert "eval/heldout/alignment" in hp["metrics"]
  scalars = tb_events.read_scalars(str(wd))
  # The lr of the update logged at steps 2, 4, 6 (counts 1, 3, 5) on the cosine schedule.
  sched = optax.warmup_cosine_decay_schedule(0.0, config.lr, max(config.warmup, 1),
                                             config.steps, end_value=0.05 * config.lr)
  assert scalars["train/lr"] == [(s, pytest.approx(float(sched(s - 1)), rel=1e-5))
                                 for s in (2, 4, 6)]
  assert [s for s, _ in scalars["train/samples_per_sec"]] == [2, 4, 6]
  images = tb_events.read_images(str(wd))
  assert set(images) == {"samples/train", "samples/heldout"}
