"""rft as an installed package: a wheel built from the repository carries configs/ (as
rft/configs/), launch/ (as rft/launch/) and rft/assets/, builds without setuptools
warnings, declares dependency floors that the tested versions agree with, and, installed
into a fresh virtualenv, runs a config by name from a directory that is not a checkout.
Config names resolve the same way in a checkout (rft.config.resolve)."""
import email
import glob
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from rft import config as config_lib
from tests.helpers import JAX_CACHE, ROOT, clean_env

# ----------------------------------------------------------------------------- resolution


def test_names_resolve_to_the_shipped_config_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  want = os.path.join(config_lib.CONFIG_DIR, "prdp.py")
  for name in ("prdp", "prdp.py", "configs/prdp.py", "configs/prdp", "./configs/prdp.py"):
    assert config_lib.resolve(name) == want, name
  assert config_lib.load("prdp.py", "smoke").epochs == 2
  assert config_lib.load("configs/prdp.py", "smoke").epochs == 2


def test_variant_after_a_colon_in_the_name():
  by_name = config_lib.load("prdp:smoke")
  assert by_name.to_dict() == config_lib.load("prdp", "smoke").to_dict()
  assert config_lib.load("prdp.py:smoke").to_dict() == by_name.to_dict()
  assert by_name.to_dict() != config_lib.load("prdp").to_dict()


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "prdp.py").write_text(
      "from ml_collections import config_dict\n"
      "def get_config(arg=None):\n"
      "  return config_dict.ConfigDict({'mine': True, 'arg': arg})\n")
  assert config_lib.resolve("prdp.py") == "prdp.py"
  assert config_lib.load("prdp.py", "x").to_dict() == {"mine": True, "arg": "x"}
  assert config_lib.load("prdp.py:y").arg == "y"
  assert "mine" not in config_lib.load("prdp", "smoke")  # "prdp" is no file here


def test_unknown_name_is_an_error_listing_the_shipped_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = config_lib.shipped_configs()
  assert "prdp" in shipped and "grpo" in shipped
  # In a checkout the shipped configs are exactly the files of configs/ but the helpers
  # they share (common.py: no get_config).
  assert shipped == sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                           if f.endswith(".py") and f != "common.py")
  assert "common" not in shipped
  # A path into another directory is not replaced by the shipped file of that name.
  for bad in ("no_such_config", "no_such_config.py:smoke", "elsewhere/prdp.py"):
    with pytest.raises(FileNotFoundError) as e:
      config_lib.load(bad)
    assert all(name in str(e.value) for name in shipped), str(e.value)


def test_a_checkout_on_pythonpath_imports_its_own_configs_package(tmp_path):
  """rft.configs (the config files' shared helpers, configs/common.py) is the configs/
  beside the rft package that was imported: also for a checkout that is only on
  PYTHONPATH while another checkout is installed in editable mode (as here)."""
  (tmp_path / "rft").mkdir()
  shutil.copy(os.path.join(ROOT, "rft", "__init__.py"), tmp_path / "rft" / "__init__.py")
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "common.py").write_text("WHERE = 'the copy'\n")
  p = subprocess.run([sys.executable, "-c", "import rft.configs.common as m; print(m.WHERE, "
                      "m.__file__)"], cwd=tmp_path, capture_output=True, text=True,
                     env=clean_env(PYTHONPATH=str(tmp_path)), timeout=120)
  assert p.returncode == 0, p.stderr
  assert p.stdout.split()[:2] == ["the", "copy"], p.stdout
  assert p.stdout.split()[-1] == str(tmp_path / "configs" / "common.py")
  # and the shipped configs import it from this checkout
  from rft.configs import common
  assert os.path.dirname(common.__file__) == os.path.join(ROOT, "configs")
  assert config_lib.load("prdp").trainer == common.base().trainer


def _main_here(cwd, *args, env=None, timeout=600):
  return subprocess.run([sys.executable, "-m", "rft.main", *args], cwd=cwd,
                        env=env or clean_env(JAX_COMPILATION_CACHE_DIR=JAX_CACHE),
                        capture_output=True, text=True, timeout=timeout)


def test_main_resolves_names_outside_the_checkout(tmp_path):
  """--config=<name>.py:smoke from an empty directory loads the shipped config: the run
  gets as far as the range check (which refuses --config.epochs=-1 before any work);
  an unknown name is a flag error listing the shipped configs."""
  p = _main_here(tmp_path, "--config=prdp.py:smoke", f"--workdir={tmp_path / 'w'}",
                 "--config.epochs=-1")
  assert p.returncode != 0 and "--config.epochs=-1" in p.stderr, p.stderr[-3000:]
  p = _main_here(tmp_path, "--config=no_such.py:smoke", f"--workdir={tmp_path / 'w'}")
  assert p.returncode != 0 and "Flags parsing error" in p.stderr, p.stderr[-3000:]
  assert all(name in p.stderr for name in config_lib.shipped_configs()), p.stderr[-3000:]
  assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- the wheel

# What setup.py reads: top-level files and these folders. The wheel is built from a copy
# so the build leaves nothing (build/, rft.egg-info) in the working tree, and no stale
# build/lib from an earlier build can leak into it.
_SOURCE_DIRS = ("rft", "configs", "launch")
_BYTE_COMPILE = "byte-compiling is disabled"  # distutils' note when PYTHONDONTWRITEBYTECODE


def _source_copy(dest):
  os.makedirs(dest)
  for f in os.listdir(ROOT):
    if os.path.isfile(os.path.join(ROOT, f)):
      shutil.copy2(os.path.join(ROOT, f), dest)
  for d in _SOURCE_DIRS:
    shutil.copytree(os.path.join(ROOT, d), os.path.join(dest, d),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
  return dest


def build_wheel(src, out):
  """`pip wheel SRC --no-deps` with the installed setuptools (no build isolation: no
  index needed); returns (path of the wheel, the build's output)."""
  p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                      "--no-build-isolation", "-v", "-w", str(out)],
                     capture_output=True, text=True, timeout=600)
  log = p.stdout + p.stderr
  assert p.returncode == 0, log[-4000:]
  wheels = glob.glob(os.path.join(str(out), "rft-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0], log


def setuptools_warnings(log: str) -> list[str]:
  """Lines of a build log that are setuptools / distutils warnings (`...Warning: ...`,
  `warning: ...`), except the byte-compiling note."""
  return [line.strip() for line in log.splitlines()
          if (re.search(r"[A-Za-z_]Warning: ", line) or re.match(r"\s*warning: ", line))
          and _BYTE_COMPILE not in line]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  base = tmp_path_factory.mktemp("wheel")
  return build_wheel(_source_copy(str(base / "src")), base / "dist")


def _files(folder):
  out = []
  for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
    dirnames[:] = [d for d in dirnames if d != "__pycache__"]
    out += [os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))
            for f in filenames if not f.endswith(".pyc")]
  assert out, folder
  return sorted(out)


def test_wheel_holds_configs_launchers_and_assets(wheel):
  path, _ = wheel
  with zipfile.ZipFile(path) as z:
    names = set(z.namelist())
    for folder, packaged in (("configs", "rft/configs"), ("launch", "rft/launch"),
                             ("rft/assets", "rft/assets")):
      for f in _files(folder):
        member = f"{packaged}/{f}"
        assert member in names, member
        with open(os.path.join(ROOT, folder, f), "rb") as src:
          assert z.read(member) == src.read(), member
    # Nothing lands outside the rft package (no top-level configs/ or launch/).
    assert {n.split("/")[0] for n in names} == {"rft", "rft-0.1.0.dist-info"}


def test_wheel_build_prints_no_setuptools_warnings(wheel):
  _, log = wheel
  assert setuptools_warnings(log) == []
  assert "adding 'rft/config.py'" in log  # the verbose build output was captured


def test_setuptools_warnings_are_recognised():
  log = ("  /x/setuptools/command/build_py.py:215: _Warning: Package 'rft.assets' is absent "
         "from the `packages` configuration.\n"
         "  warning: build_py: byte-compiling is disabled, skipping.\n"
         "  SetuptoolsDeprecationWarning: License classifiers are deprecated.\n"
         "  warning: no files found matching '*.txt'\n"
         "  WARNING: Running pip as the 'root' user\n")
  assert len(setuptools_warnings(log)) == 3


def _declared_requirements(wheel_path) -> list[Requirement]:
  with zipfile.ZipFile(wheel_path) as z:
    meta = email.message_from_bytes(z.read("rft-0.1.0.dist-info/METADATA"))
  return [Requirement(r) for r in meta.get_all("Requires-Dist")
          if "extra ==" not in r]


def _floor(req: Requirement) -> Version | None:
  floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
  return max(floors) if floors else None


def test_dependency_floors_agree_with_the_tested_versions(wheel):
  """Every declared requirement holds for the installed (tested) versions, and no floor
  admits a version that an installed dependency itself rules out (e.g. jax>=0.4.30
  next to flax 0.12.8, which needs jax>=0.10.0)."""
  core = {canonicalize_name(r.name): r for r in _declared_requirements(wheel[0])}
  assert {"jax", "flax", "optax", "numpy"} <= set(core)
  for name, req in core.items():
    assert req.specifier.contains(metadata.version(name), prereleases=True), (req, name)
    assert _floor(req) is not None, f"{req}: no floor"
  clashes = []
  for name in core:
    for raw in metadata.requires(name) or ():
      dep = Requirement(raw)
      other = canonicalize_name(dep.name)
      if other not in core or (dep.marker and not dep.marker.evaluate({"extra": ""})):
        continue
      theirs, ours = _floor(dep), _floor(core[other])
      if theirs is not None and ours < theirs:
        clashes.append(f"{name} {metadata.version(name)} needs {dep}, setup.py allows "
                       f"{core[other]}")
  assert clashes == [], clashes


# ------------------------------------------------------------------ installed in a venv


def _venv_with_wheel(venv, wheel_path):
  """A fresh venv that sees this interpreter's packages (jax, ...) and has the wheel as
  its rft (pip --no-deps --force-reinstall)."""
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                 check=True, capture_output=True, timeout=600)
  py = str(venv / "bin" / "python")
  if sys.prefix != sys.base_prefix:
    # These tests run in a venv themselves: --system-site-packages reaches the base
    # interpreter's packages, not this venv's, so add this venv's after the new one's.
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], check=True, capture_output=True,
                             text=True).stdout.strip()
    with open(os.path.join(purelib, "zz_outer_site_packages.pth"), "w") as f:
      f.writelines(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages())
  p = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--force-reinstall",
                      "--no-index", wheel_path], capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
  return py


def _env_outside_checkout():
  env = clean_env(JAX_COMPILATION_CACHE_DIR=JAX_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  env.pop("PYTHONPATH")  # the checkout's rft must not be importable
  return env


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
  base = tmp_path_factory.mktemp("installed")
  py = _venv_with_wheel(base / "venv", wheel[0])
  empty = base / "empty"
  empty.mkdir()
  return py, base / "venv", empty


def test_installed_wheel_finds_configs_launchers_and_assets(installed):
  py, venv, empty = installed
  p = subprocess.run(
      [py, "-c", "import rft, rft.config as c, rft.pretrained as pt, rft.launch.common as lc; "
       "print(rft.__file__); print(c.resolve('prdp.py')); print(pt.ASSETS); "
       "print(lc.IN_CHECKOUT, lc.ROOT)"],
      cwd=empty, env=_env_outside_checkout(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  rft_file, prdp, assets, launch = p.stdout.splitlines()
  site_rft = os.path.dirname(rft_file)
  assert rft_file.startswith(str(venv)), rft_file  # the wheel, not the checkout
  assert prdp == os.path.join(site_rft, "configs", "prdp.py")
  assert os.path.isfile(os.path.join(assets, "shapes_base.msgpack"))
  assert launch == f"False {empty}"  # launchers installed: commands run in the cwd
  p = subprocess.run([py, "-m", "rft.launch.local", "--config=prdp.py:smoke", "--dry_run"],
                     cwd=empty, env=_env_outside_checkout(), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0 and "-m rft.main --config=prdp.py:smoke" in p.stdout, p.stderr
  # An unknown name lists the configs the wheel ships.
  p = subprocess.run([py, "-m", "rft.main", "--config=no_such.py"], cwd=empty,
                     env=_env_outside_checkout(), capture_output=True, text=True, timeout=600)
  assert p.returncode != 0 and "prdp, pretrain_arith" in p.stderr, p.stderr[-3000:]
  assert os.listdir(empty) == []


@pytest.mark.slow
def test_installed_wheel_runs_a_smoke_config_by_name(installed, tmp_path):
  """`python -m rft.main --config=prdp.py:smoke` with rft installed from the wheel, from
  an empty directory: the run finishes and writes its results."""
  py, _, empty = installed
  p = subprocess.run([py, "-m", "rft.main", "--config=prdp.py:smoke",
                      f"--workdir={tmp_path / 'w'}"], cwd=empty, env=_env_outside_checkout(),
                     capture_output=True, text=True, timeout=1800)
  assert p.returncode == 0, p.stderr[-4000:]
  assert os.path.isfile(tmp_path / "w" / "results.json")
  assert os.path.isdir(tmp_path / "w" / "checkpoints")
  assert os.listdir(empty) == []
