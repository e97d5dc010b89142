"""rft.config.check_ranges: every count, rate and probability is checked before any work,
naming the key as it is typed; every shipped config and variant passes."""
import math
import os
import re

import pytest

from rft import config as config_lib
from tests.helpers import run_main


def test_range_by_hand():
  count = config_lib.Range(1, integer=True)
  assert count.holds(1) and count.holds(7) and count.holds(3.0)
  assert not any(count.holds(v) for v in (0, -1, 2.5, True, "3", math.nan, None))
  assert count.describe() == "an integer >= 1"
  p = config_lib.Range(0.0, 1.0, high_open=True)
  assert p.holds(0.0) and p.holds(0.999) and not p.holds(1.0) and not p.holds(-0.1)
  assert p.describe() == "a number >= 0 and < 1"
  lr = config_lib.RANGES["lr"]
  assert not lr.holds(0.0) and not lr.holds(math.inf) and not lr.holds(math.nan) and lr.holds(1e-30)


def test_errors_name_every_bad_key():
  cfg = config_lib.load("prdp", "smoke")
  with cfg.unlocked():
    cfg.epochs = -1
    cfg.prompts_per_epoch = 0
    cfg.lr = math.nan
    cfg.sampler.eta = -1.0
  with pytest.raises(ValueError) as e:
    config_lib.check_ranges(cfg)
  msg = str(e.value)
  for want in ("--config.epochs=-1 (must be an integer >= 1)",
               "--config.prompts_per_epoch=0", "--config.lr=nan (must be a number > 0)",
               "--config.sampler.eta=-1.0 (must be a number >= 0)"):
    assert want in msg, msg


def _variants(path):
  m = re.search(r"parse_arg\(arg, \(([^)]*)\)", open(path).read())
  return [None] + ([v.strip().strip("\"'") for v in m.group(1).split(",") if v.strip()]
                   if m else [])


def test_every_shipped_config_and_variant_is_in_range():
  checked = 0
  for name in config_lib.shipped_configs():
    path = os.path.join(config_lib.CONFIG_DIR, f"{name}.py")
    for v in _variants(path):
      config_lib.check_ranges(config_lib.load(path, v))
      checked += 1
  assert checked >= 19  # every diffusion row of every smoke preset


def test_main_stops_before_any_work(tmp_path):
  p = run_main("configs/prdp.py:smoke", tmp_path / "wd", "--config.epochs=-1", check=False)
  assert p.returncode != 0 and "--config.epochs=-1 (must be an integer >= 1)" in p.stderr
  assert not (tmp_path / "wd").exists()


def test_variants_combined_with_smoke_pass_the_trainers_checks():
  """A variant that sizes something by the sampler (draft:full, K = T) still holds after
  smoke shortens the chain; rft.repro's smoke presets combine every row with smoke."""
  from rft.train import diffusion_rl
  c = config_lib.load("draft", "full,smoke")
  assert c.objective.grad_steps == c.sampler.num_steps == 3
  diffusion_rl.validate(c)
  from rft.repro import tables
  checked = 0
  for t in tables.ALL.values():
    smoke = t.presets.get("smoke")
    for row in t.rows if smoke else ():
      if row.name not in smoke.rows:
        continue
      path, _, arg = row.config.partition(":")
      c = config_lib.load(path, f"{arg},smoke" if arg else "smoke")
      if c.trainer == "diffusion_rl":  # the other trainers check at their start
        diffusion_rl.validate(c)
        checked += 1
  assert checked >= 19  # every diffusion row of every smoke preset
