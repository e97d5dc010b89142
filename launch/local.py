"""Run an rft job on this machine: python launch/local.py --config=configs/X.py[:arg] [...].

Builds the exact `python -m rft.main` command (extra flags such as --config.key=value
pass through), prints it, and runs it unless --dry_run. Beside it: launch/slurm.py (GPU
clusters) and launch/tpu_pod.py (Cloud TPU VM pods). With rft installed from a wheel
(no checkout), the same launchers run as `python -m rft.launch.local` (.slurm, .tpu_pod).

--processes N starts N jax processes of one job here (RFT_COORDINATOR on 127.0.0.1,
RFT_NUM_PROCESSES, RFT_PROCESS_ID): one per GPU with --gpus_per_process 1 (each sees
its GPUs through RFT_LOCAL_DEVICE_IDS), or, to try a multi-host setup on a laptop, on
CPU with --cpu_devices K fake devices each (gloo collectives):

  python launch/local.py --config=configs/prdp.py:smoke --processes=2 --cpu_devices=4 \\
      --config.mesh.data=2 --config.mesh.fsdp=4
"""
from __future__ import annotations

import sys

if __package__:  # imported as launch.<module> (a checkout) or rft.launch.<module> (a wheel)
  from . import common
else:  # run as a script: launch/ is sys.path[0]
  import common


def build_command(config: str, workdir: str | None, extra: list[str], python: str) -> list[str]:
  return common.rft_command(config, workdir, extra, python=python)


def process_envs(processes: int, port: int, cpu_devices: int = 0,
                 gpus_per_process: int = 0) -> list[list[tuple[str, str]]]:
  """The environment assignments of each of `processes` local jax processes."""
  envs = []
  for i in range(processes):
    env = []
    if processes > 1:
      env += [("RFT_COORDINATOR", f"127.0.0.1:{port}"),
              ("RFT_NUM_PROCESSES", str(processes)), ("RFT_PROCESS_ID", str(i))]
    if gpus_per_process:
      ids = range(i * gpus_per_process, (i + 1) * gpus_per_process)
      env.append(("RFT_LOCAL_DEVICE_IDS", ",".join(map(str, ids))))
    if cpu_devices:
      env += [("JAX_PLATFORMS", "cpu"),
              ("XLA_FLAGS", f"--xla_force_host_platform_device_count={cpu_devices}")]
    envs.append(env)
  return envs


def main(argv=None) -> int:
  p = common.parser(__doc__)
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--processes", type=int, default=1, help="jax processes of this job")
  p.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  p.add_argument("--cpu_devices", type=int, default=0,
                 help="run on CPU with this many fake devices per process")
  p.add_argument("--gpus_per_process", type=int, default=0,
                 help="GPUs each process drives (RFT_LOCAL_DEVICE_IDS)")
  args, extra = p.parse_known_args(argv)
  if args.processes < 1:
    p.error(f"--processes={args.processes} must be >= 1")
  if args.cpu_devices and args.gpus_per_process:
    p.error("--cpu_devices and --gpus_per_process exclude each other")
  cmd = build_command(args.config, args.workdir, common.passthrough(p, extra, strict=False),
                      args.python)
  envs = process_envs(args.processes, args.port or common.free_port(), args.cpu_devices,
                      args.gpus_per_process)
  if args.processes == 1 and not envs[0]:
    return common.execute([cmd], args.dry_run)
  return common.execute_together([(env, cmd) for env in envs], args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
