"""Running a table's rows (method x seed) through the normal configs, resumably.

Each run is `python -m rft.main --config=configs/<row>.py[:arg] --workdir=<run dir>
--config.seed=s --config.eval_seed=s --config.<key>=<value> ...` in its own process, its
console output in `<run dir>/log.txt`. A run whose results.json exists is finished and
skipped; an interrupted one is resumed by the same command (rft.main continues from its
latest checkpoint, bit for bit). The command is stored in `<run dir>/command.json`; a run
directory made by a different command is an error, never silently mixed. Run directories
may be local or not (gs://...: files through rft.paths).

The report keeps each finished run's record (its command and results.json) in the table's
folder, `<workdir>/<table>/<preset>/records/<row>/seed<k>.json`: a run whose folder is gone
(checkpoints are large; a committed table keeps only its report) counts as finished from
its record, so a table can be re-reported and extended with more seeds (`--seeds 3-5`)
without its run folders. A record made by a different command is an error.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

from rft import config as config_lib
from rft import paths
from rft.repro import tables as tables_lib


@dataclasses.dataclass(frozen=True)
class Run:
  table: str
  row: str
  seed: int
  workdir: str
  argv: tuple[str, ...]  # after `python -m rft.main`
  record: str = ""  # the run's record in the table's folder (see the module doc)

  @property
  def has_results(self) -> bool:
    return paths.path(os.path.join(self.workdir, "results.json")).exists()

  @property
  def done(self) -> bool:
    return self.has_results or self._stored() is not None

  def results(self) -> dict:
    if self.has_results:
      return paths.read_json(os.path.join(self.workdir, "results.json"))
    stored = self._stored()
    if stored is None:
      raise FileNotFoundError(f"{self.workdir}/results.json (run not finished, no record "
                              f"at {self.record or '-'})")
    return stored["results"]

  def _stored(self) -> dict | None:
    if not self.record or not paths.path(self.record).exists():
      return None
    stored = paths.read_json(self.record)
    if tuple(stored["command"]) != command_key(self.argv):
      changed = sorted(set(stored["command"]) ^ set(command_key(self.argv)))
      raise ValueError(f"record {self.record} was made by a different command (differs in "
                       f"{changed}); remove it or pass another --workdir")
    return stored


def command_key(argv) -> tuple[str, ...]:
  """A run's command without what differs between machines: the run folder, and the
  config file's directory (`--config=prdp.py:arg`)."""
  out = []
  for a in argv:
    if a.startswith("--workdir="):
      continue
    if a.startswith("--config="):
      a = "--config=" + os.path.basename(a[len("--config="):])
    out.append(a)
  return tuple(out)


def seed_list(seeds, default: int) -> list[int]:
  """The seeds to run: None -> the preset's count (0..default-1); an int N or "N" -> 0..N-1;
  "A-B" -> A..B; "a,b,c" -> those."""
  if seeds is None:
    return list(range(default))
  if isinstance(seeds, int):
    return list(range(seeds))
  text = str(seeds).strip()
  try:
    if "," in text:
      out = [int(x) for x in text.split(",") if x.strip()]
    elif "-" in text.lstrip("-"):
      a, b = text.split("-", 1)
      out = list(range(int(a), int(b) + 1))
    else:
      out = list(range(int(text)))
  except ValueError:
    raise ValueError(f"--seeds {seeds!r}: use a count (3), a range (3-5) or a list "
                     "(0,2,4)") from None
  if not out and text.isdigit():  # a count of zero
    raise ValueError(f"--seeds {seeds!r} is a count of seeds (3 = seeds 0-2) and runs none; "
                     f"for seed {int(text)} alone write a range or a list: --seeds "
                     f"{int(text)}-{int(text)} or --seeds {int(text)},")
  if not out or min(out) < 0 or len(set(out)) != len(out):
    raise ValueError(f"--seeds {seeds!r}: gives {out}; seeds are distinct and >= 0")
  return out


def _flag(key: str, value) -> str:
  if isinstance(value, bool):
    value = str(value).lower()
  elif isinstance(value, (list, tuple, dict)):  # e.g. an ensemble's members: JSON
    value = json.dumps(value, separators=(",", ":"), sort_keys=True)
  return f"--config.{key}={value}"


@functools.lru_cache(maxsize=None)
def _has_eval_seed(config_file: str) -> bool:
  path, _, arg = config_file.partition(":")
  return "eval_seed" in config_lib.load(path, arg or None)


def plan(table: tables_lib.Table, preset_name: str, workdir: str,
         seeds: int | str | None = None, rows: list[str] | None = None) -> list[Run]:
  """Every (row, seed) run of the preset, in order: seed-major, so a partial table has
  every method at the first seeds before any method at the later ones. `seeds`: see
  seed_list."""
  preset = table.preset(preset_name)
  names = [r.name for r in table.rows if r.name in preset.rows]
  if rows:
    unknown = [r for r in rows if r not in names]
    if unknown:
      raise ValueError(f"--rows {unknown}: table {table.name} preset {preset_name} runs {names}")
    names = [n for n in names if n in rows]
  out = []
  for seed in seed_list(seeds, preset.seeds):
    for name in names:
      row = table.row(name)
      config = row.config
      if preset.config_arg:
        config += ("," if ":" in config else ":") + preset.config_arg
      path, _, arg = config.partition(":")
      file = os.path.join(config_lib.CONFIG_DIR, f"{path}.py") + (f":{arg}" if arg else "")
      overrides = dict(preset.common, **preset.rows[name], seed=seed)
      if _has_eval_seed(file):  # the trainers' evaluation noise; ReNO's seed sets both
        overrides["eval_seed"] = seed
      if preset.cpu_devices:
        overrides["cpu_devices"] = preset.cpu_devices
      run_dir = os.path.join(workdir, table.name, preset_name, name, f"seed{seed}")
      argv = (f"--config={file}", f"--workdir={run_dir}",
              *(_flag(k, v) for k, v in overrides.items()))
      record = os.path.join(workdir, table.name, preset_name, "records", name, f"seed{seed}.json")
      out.append(Run(table.name, name, seed, run_dir, argv, record))
  return out


def check_configs(runs: list[Run]) -> None:
  """Build every run's config with its overrides (an unknown key or bad value is an error
  naming the run) before any run starts."""
  for r in runs:
    file = r.argv[0].split("=", 1)[1]
    path, _, arg = file.partition(":")
    config = config_lib.load(path, arg or None)
    items = [a[len("--config."):] for a in r.argv if a.startswith("--config.")]
    options = [i[len("reward_options."):] for i in items if i.startswith("reward_options.")]
    try:
      config_lib.apply_overrides(config, [i for i in items
                                          if not i.startswith("reward_options.")])
      if options:  # entries the config file may lack, as rft.main creates them
        config_lib.set_reward_options(config, options)
    except (KeyError, ValueError) as e:
      raise ValueError(f"{r.table} row {r.row} seed {r.seed}: {e}") from None


def _check_command(run: Run) -> None:
  path = os.path.join(run.workdir, "command.json")
  if paths.path(path).exists():
    stored = tuple(paths.read_json(path)["argv"])
    if stored != run.argv:
      changed = sorted(set(stored) ^ set(run.argv))
      raise ValueError(f"{run.workdir} was started by a different command (differs in "
                       f"{changed}); remove it or pass another --workdir")
  else:
    paths.write_json(path, {"argv": list(run.argv)}, indent=1)


def _run_logged(argv: list, log: str, env: dict) -> int:
  """Runs `argv`, its output (stdout and stderr) appended to file `log`: streamed into it
  when local; elsewhere kept in a local temporary file and appended when the run ends.
  Returns the exit status."""
  if paths.is_local(log):
    with open(log, "a") as f:
      return subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
  with tempfile.TemporaryFile() as f:
    code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    f.seek(0)
    paths.append_text(log, f.read().decode("utf-8", "replace"))
  return code


def keep_records(runs: list[Run]) -> int:
  """Writes the record of every run finished in its folder (module doc); returns how many."""
  n = 0
  for r in runs:
    if r.record and r.has_results:
      paths.write_json(r.record, {"command": list(command_key(r.argv)), "results": r.results()},
                       indent=1)
      n += 1
  return n


def execute(runs: list[Run], env: dict | None = None, echo=print, retries: int = 2) -> None:
  """Run what is not finished, one at a time (each run uses all local devices).

  A run killed by a signal (e.g. XLA's collective watchdog aborting a stalled CPU
  collective, or an out-of-memory kill) is resumed from its last checkpoint up to
  `retries` times; a run that exits with an error is not retried.
  """
  todo = [r for r in runs if not r.done]
  echo(f"{len(runs) - len(todo)} of {len(runs)} runs already finished")
  t_all = time.time()
  for i, run in enumerate(todo):
    _check_command(run)
    t0 = time.time()
    echo(f"[{i + 1}/{len(todo)}] {run.table} {run.row} seed {run.seed} -> {run.workdir}")
    for attempt in range(retries + 1):
      code = _run_logged([sys.executable, "-m", "rft.main", *run.argv],
                         os.path.join(run.workdir, "log.txt"), dict(os.environ, **(env or {})))
      if code >= 0 or attempt == retries:
        break
      echo(f"    killed by signal {-code}; resuming from its last checkpoint "
           f"({attempt + 1}/{retries})")
    if code != 0:
      tail = paths.path(os.path.join(run.workdir, "log.txt")).read_text()[-3000:]
      raise RuntimeError(f"{run.table} row {run.row} seed {run.seed} failed (exit "
                         f"{code}); log: {run.workdir}/log.txt\n{tail}")
    done = time.time() - t0
    left = (time.time() - t_all) / (i + 1) * (len(todo) - i - 1)
    echo(f"    finished in {done / 60:.1f} min; about {left / 60:.0f} min left")
