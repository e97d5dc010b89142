"""Launchers print the exact commands / sbatch scripts, and overrides survive the shells.

The quoting tests do not stop at comparing strings: they run the generated sbatch script
and the TPU workers' --command string with bash (fake srun, gcloud, sbatch and a fake
`python` that reports its argv) and check rft.main would receive the override unchanged.
"""
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

from tests.helpers import ROOT

NASTY = "--config.prompt=it's a \"cat\" $HOME `id` [a-z]* \\ ; & | $(x) done"


def _launch(script, *args, env=None, check=True):
  p = subprocess.run([sys.executable, f"launch/{script}", *args], cwd=ROOT, capture_output=True,
                     text=True, env=dict(os.environ, **(env or {})))
  if check:
    assert p.returncode == 0, p.stderr
  return p


def _exe(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_tools(tmp_path):
  """bin/ with a fake `python` (prints its argv and $MSG as JSON), `srun` (drops its
  options, runs the rest), `sbatch` and `gcloud` (log argv); venv/bin/activate puts bin/
  first on PATH."""
  bin_ = tmp_path / "bin"
  bin_.mkdir()
  _exe(bin_ / "python", f"#!{sys.executable}\nimport json, os, sys\n"
       "print(json.dumps({'argv': sys.argv[1:], 'MSG': os.environ.get('MSG')}))\n")
  _exe(bin_ / "srun", '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
  for tool in ("sbatch", "gcloud"):
    _exe(bin_ / tool, f"#!{sys.executable}\nimport json, sys\n"
         f"open({str(tmp_path / (tool + '.log'))!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text(f'export PATH={shlex.quote(str(bin_))}:"$PATH"\n')
  return bin_, venv


def test_local_dry_run_prints_exact_command():
  out = _launch("local.py", "--config=configs/pretrain_shapes.py:smoke", "--workdir=/tmp/x",
                "--config.steps=3", "--python=python3", "--dry_run").stdout.strip()
  assert shlex.split(out) == ["python3", "-m", "rft.main",
                              "--config=configs/pretrain_shapes.py:smoke", "--workdir=/tmp/x",
                              "--config.steps=3"]


def test_local_passes_a_nasty_override_through():
  out = _launch("local.py", "--config=c.py", NASTY, "--alsologtostderr", "--python=py",
                "--dry_run").stdout.strip()
  assert shlex.split(out) == ["py", "-m", "rft.main", "--config=c.py", NASTY,
                              "--alsologtostderr"]


def test_local_processes_dry_run_prints_one_command_per_process():
  out = _launch("local.py", "--config=configs/prdp.py:smoke", "--processes=2", "--port=4321",
                "--cpu_devices=4", "--python=py", "--dry_run", "--config.mesh.fsdp=8",
                "--config.mesh.data=1").stdout.strip().splitlines()
  flags = ["py", "-m", "rft.main", "--config=configs/prdp.py:smoke", "--config.mesh.fsdp=8",
           "--config.mesh.data=1"]
  assert [shlex.split(line) for line in out] == [
      ["RFT_COORDINATOR=127.0.0.1:4321", "RFT_NUM_PROCESSES=2", f"RFT_PROCESS_ID={i}",
       "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4", *flags]
      for i in range(2)]
  out = _launch("local.py", "--config=c.py", "--processes=2", "--port=9", "--gpus_per_process=2",
                "--python=py", "--dry_run").stdout.strip().splitlines()
  assert [shlex.split(line)[:4] for line in out] == [
      ["RFT_COORDINATOR=127.0.0.1:9", "RFT_NUM_PROCESSES=2", "RFT_PROCESS_ID=0",
       "RFT_LOCAL_DEVICE_IDS=0,1"],
      ["RFT_COORDINATOR=127.0.0.1:9", "RFT_NUM_PROCESSES=2", "RFT_PROCESS_ID=1",
       "RFT_LOCAL_DEVICE_IDS=2,3"]]
  p = _launch("local.py", "--config=c.py", "--processes=0", "--dry_run", check=False)
  assert p.returncode != 0 and "--processes=0 must be >= 1" in p.stderr


def test_local_processes_start_together_with_their_environment(tmp_path):
  """The processes really run (a fake python reports argv and the RFT_* variables), and a
  failing process stops its peer instead of leaving it waiting."""
  bin_ = tmp_path / "bin"
  bin_.mkdir()
  _exe(bin_ / "python", f"#!{sys.executable}\nimport json, os, sys, time\n"
       f"out = {str(tmp_path)!r} + '/p' + os.environ['RFT_PROCESS_ID']\n"
       "open(out, 'w').write(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v in "
       "os.environ.items() if k.startswith('RFT_')}}))\n"
       "if os.environ.get('FAIL') == os.environ['RFT_PROCESS_ID']: sys.exit(3)\n"
       "time.sleep(60 if os.environ.get('FAIL') else 0)\n")
  py = str(bin_ / "python")
  p = _launch("local.py", "--config=c.py", "--processes=2", "--port=5555", f"--python={py}",
              NASTY)
  for i in range(2):
    got = json.loads((tmp_path / f"p{i}").read_text())
    assert got["argv"] == ["-m", "rft.main", "--config=c.py", NASTY]
    assert got["env"] == {"RFT_COORDINATOR": "127.0.0.1:5555", "RFT_NUM_PROCESSES": "2",
                          "RFT_PROCESS_ID": str(i)}
  import time
  t0 = time.time()
  p = _launch("local.py", "--config=c.py", "--processes=2", f"--python={py}", check=False,
              env={"FAIL": "1"})
  assert p.returncode == 3 and time.time() - t0 < 30  # process 0 was stopped, not awaited


def test_slurm_dry_run_prints_exact_script_and_sbatch_command():
  out = _launch("slurm.py", "--config=configs/prdp.py:sd", "--workdir=/shared/run", "--nodes=2",
                "--gpus_per_node=4", "--partition=gpu", "--account=proj", "--time=1-00:00:00",
                "--venv=/shared/venv", "--env=XLA_PYTHON_CLIENT_MEM_FRACTION=.9",
                "--env=MSG=a b", "--sbatch_arg=--qos=high", "--chdir=/shared/rft", "--dry_run", NASTY,
                "--", "--alsologtostderr").stdout
  override = shlex.quote(NASTY)
  assert out == f"""#!/bin/bash
#SBATCH --job-name=rft-prdp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --time=1-00:00:00
#SBATCH --partition=gpu
#SBATCH --account=proj
#SBATCH --output=/shared/run/slurm-%j.out
#SBATCH --chdir=/shared/rft
#SBATCH --qos=high
# rft.distributed reads the coordinator, process count and id from srun's SLURM_* variables.
set -eo pipefail
source /shared/venv/bin/activate
export XLA_PYTHON_CLIENT_MEM_FRACTION=.9
export MSG='a b'
srun --kill-on-bad-exit=1 python -m rft.main --config=configs/prdp.py:sd --workdir=/shared/run \
--distributed=on {override} --alsologtostderr

sbatch /shared/run/rft.sbatch
"""


def test_slurm_one_task_per_gpu_and_defaults():
  out = _launch("slurm.py", "--config=configs/grpo.py:tiny", "--workdir=runs/g", "--nodes=3",
                "--tasks=gpu", "--gpus_per_node=8", "--cpus_per_task=12", "--venv=",
                "--dry_run").stdout
  lines = out.splitlines()
  assert lines[1:7] == ["#SBATCH --job-name=rft-grpo", "#SBATCH --nodes=3",
                        "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                        "#SBATCH --cpus-per-task=12", "#SBATCH --time=04:00:00"]
  assert f"#SBATCH --output={ROOT}/runs/g/slurm-%j.out" in lines  # relative to the job's chdir
  assert f"#SBATCH --chdir={ROOT}" in lines
  assert not any(l.startswith("source") for l in lines)
  assert shlex.split(lines[-3]) == ["srun", "--kill-on-bad-exit=1", "python", "-m", "rft.main",
                                    "--config=configs/grpo.py:tiny", "--workdir=runs/g",
                                    "--distributed=on"]
  assert lines[-1] == shlex.join(["sbatch", f"{ROOT}/runs/g/rft.sbatch"])


def test_slurm_script_runs_and_submits_with_the_override_intact(tmp_path):
  """The written script, run by bash (fake srun/python), hands rft.main the exact argv;
  without --dry_run the launcher writes it and calls sbatch on it."""
  bin_, venv = _fake_tools(tmp_path)
  workdir = tmp_path / "run dir"  # a space: fine for rft.main, not for #SBATCH --output
  p = _launch("slurm.py", "--config=c.py", f"--workdir={workdir}", f"--venv={venv}",
              "--env=MSG=it's $HOME", f"--output={tmp_path}/log-%j.out", NASTY,
              "--config.steps", "3", env={"PATH": f"{bin_}:{os.environ['PATH']}"})
  script = workdir / "rft.sbatch"
  assert p.stdout.splitlines() == [f"# wrote {script}", shlex.join(["sbatch", str(script)])]
  assert [json.loads(l) for l in (tmp_path / "sbatch.log").read_text().splitlines()] == [
      [str(script)]]
  ran = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
  assert ran.returncode == 0, ran.stderr
  assert json.loads(ran.stdout) == {
      "argv": ["-m", "rft.main", "--config=c.py", f"--workdir={workdir}", "--distributed=on",
               NASTY, "--config.steps", "3"],
      "MSG": "it's $HOME"}


@pytest.mark.parametrize("args,message", [
    (["--nodse=2"], "unknown flag '--nodse=2'"),
    (["--workdir=a b"], "directive value cannot be empty or hold whitespace"),
    (["--partition=a b"], "'--partition=a b'"),
    (["--env=1X=2"], "--env '1X=2': expected NAME=VALUE"),
    (["--sbatch_arg=qos high"], "expected one sbatch option"),
    (["--nodes=0"], "--nodes=0 must be >= 1"),
])
def test_slurm_usage_errors_name_the_flag(args, message):
  p = _launch("slurm.py", "--config=c.py", "--workdir=w", *args, "--dry_run", check=False)
  assert p.returncode == 2 and message in p.stderr, p.stderr


def test_tpu_pod_dry_run_prints_exact_commands():
  out = _launch("tpu_pod.py", "--tpu=pod-1", "--zone=us-central2-b", "--project=proj",
                "--config=configs/grpo.py", "--workdir=gs://bucket/run", "--tarball=/tmp/src.tgz",
                "--env=MSG=a b", NASTY, "--dry_run").stdout
  cmds = [shlex.split(line) for line in out.splitlines()]
  tail = ["--zone=us-central2-b", "--project=proj", "--worker=all"]
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert cmds == [
      ["tar", "-czf", "/tmp/src.tgz", "--exclude=.git", "--exclude=.venv", "--exclude=workdirs",
       "--exclude=.pytest_cache", "--exclude=__pycache__", "--exclude=*.egg-info", "-C", ROOT,
       "."],
      [*gcloud, "scp", "/tmp/src.tgz", "pod-1:rft-src.tar.gz", *tail],
      [*gcloud, "ssh", "pod-1",
       "--command=mkdir -p rft && tar -xzf rft-src.tar.gz -C rft && rm -f rft-src.tar.gz && "
       "cd rft && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && "
       "pip install -q -e . 'jax[tpu]'", *tail],
      [*gcloud, "ssh", "pod-1",
       "--command=cd rft && . .venv/bin/activate && MSG='a b' python -m rft.main "
       f"--config=configs/grpo.py --workdir=gs://bucket/run --distributed=on {shlex.quote(NASTY)}",
       *tail]]


def test_tpu_pod_clone_mode_runs_gcloud_and_the_worker_command_keeps_the_override(tmp_path):
  """--repo_url: clone on the workers; without --dry_run gcloud gets exactly the printed
  argv; the workers' --command, run by bash in a fake home, hands rft.main the argv."""
  bin_, venv = _fake_tools(tmp_path)
  p = _launch("tpu_pod.py", "--tpu=p", "--zone=z", "--config=c.py", "--workdir=gs://b/r",
              "--repo_url=https://example.com/a b.git", "--ref=v1.0", "--remote_dir=src/rft",
              "--jax_spec=jax[tpu]==0.10.2", "--env=MSG=x'y", NASTY,
              env={"PATH": f"{bin_}:{os.environ['PATH']}"})
  printed = [shlex.split(line) for line in p.stdout.splitlines()]
  called = [["gcloud", *json.loads(l)] for l in (tmp_path / "gcloud.log").read_text().splitlines()]
  assert printed == called and len(called) == 2
  setup, run = (c[6][len("--command="):] for c in called)
  assert setup == ("(test -d src/rft/.git || git clone 'https://example.com/a b.git' src/rft) && "
                   "git -C src/rft fetch origin v1.0 && git -C src/rft checkout --force FETCH_HEAD"
                   " && cd src/rft && python3 -m venv .venv && . .venv/bin/activate && "
                   "pip install -q -U pip && pip install -q -e . 'jax[tpu]==0.10.2'")
  assert called[1][7:] == ["--zone=z", "--worker=all"]
  home = tmp_path / "home"
  (home / "src" / "rft").mkdir(parents=True)
  os.symlink(venv, home / "src" / "rft" / ".venv")
  ran = subprocess.run(["bash", "-c", run], cwd=home, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
  assert ran.returncode == 0, ran.stderr
  assert json.loads(ran.stdout) == {
      "argv": ["-m", "rft.main", "--config=c.py", "--workdir=gs://b/r", "--distributed=on",
               NASTY], "MSG": "x'y"}


def test_tpu_pod_skip_setup_and_errors():
  out = _launch("tpu_pod.py", "--tpu=p", "--zone=z", "--config=c.py", "--workdir=gs://b/r",
                "--skip_setup", "--dry_run").stdout
  assert [shlex.split(l) for l in out.splitlines()] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "p",
       "--command=cd rft && . .venv/bin/activate && python -m rft.main --config=c.py "
       "--workdir=gs://b/r --distributed=on", "--zone=z", "--worker=all"]]
  for args, message in [(["--remote_dir=/opt/rft"], "give a path under the home directory"),
                        (["--worker=0"], "unknown flag '--worker=0'")]:
    p = _launch("tpu_pod.py", "--tpu=p", "--zone=z", "--config=c.py", "--workdir=w", *args,
                "--dry_run", check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr
  p = _launch("tpu_pod.py", "--zone=z", "--config=c.py", "--workdir=w", "--dry_run", check=False)
  assert p.returncode == 2 and "--tpu" in p.stderr
