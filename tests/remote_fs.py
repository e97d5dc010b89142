"""A non-local filesystem for tests: `fakeremote://<path>` URIs stored under a local folder.

`install(root)` teaches `etils.epath` the `fakeremote://` scheme (as it knows `gs://`:
same path class, a backend of its own) and points orbax's TensorStore array files at the
same folder, so a whole run can use `--workdir=fakeremote://bucket/run`. Everything that
goes through epath lands in `root/bucket/run`; a plain `open()`, `os.makedirs()` or
`os.path.*` on such a workdir path instead sees a relative local path starting with
`fakeremote:` (a stray `fakeremote:` folder in the working directory, or a file reported
missing). Like an object store, the backend has no append mode.

`python -m tests.remote_fs --config=... --workdir=fakeremote://...` runs rft.main with the
scheme installed under the folder named by $RFT_FAKE_REMOTE_ROOT.
"""
# pylint: disable=protected-access  (epath and orbax have no public hook for this)
from __future__ import annotations

import os

SCHEME = "fakeremote"
PREFIX = SCHEME + "://"
ENV = "RFT_FAKE_REMOTE_ROOT"


def _backend_cls():
  from etils.epath import backend as backend_lib  # pylint: disable=g-import-not-at-top

  class FakeRemoteBackend(backend_lib.Backend):
    """epath's os backend on `root/<path>` for `fakeremote://<path>`."""

    def __init__(self, root: str):
      self.root = os.path.abspath(root)
      self._os = backend_lib.os_backend

    def local(self, path) -> str:
      path = os.fspath(path)
      if not path.startswith(PREFIX):
        raise ValueError(f"not a {PREFIX} path: {path!r}")
      return os.path.join(self.root, path[len(PREFIX):])

    def remote(self, local) -> str:
      return PREFIX + os.path.relpath(os.fspath(local), self.root)

    def open(self, path, mode):
      if "a" in mode or "+" in mode:
        raise NotImplementedError(f"{PREFIX}: no append/update mode (like an object store): "
                                  f"{mode!r} for {path}")
      return self._os.open(self.local(path), mode)

    def exists(self, path):
      return self._os.exists(self.local(path))

    def isdir(self, path):
      return self._os.isdir(self.local(path))

    def listdir(self, path):
      return self._os.listdir(self.local(path))

    def glob(self, path):
      return [self.remote(p) for p in self._os.glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
      for root, dirs, files in self._os.walk(self.local(top), top_down=top_down,
                                             on_error=on_error):
        yield self.remote(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
      self._os.makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
      self._os.mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
      self._os.rmtree(self.local(path))

    def remove(self, path):
      self._os.remove(self.local(path))

    def rename(self, path, dst):
      self._os.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
      self._os.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
      self._os.copy(self.local(path), self.local(dst), overwrite)

    def stat(self, path):
      return self._os.stat(self.local(path))

  return FakeRemoteBackend


def install(root: str) -> None:
  """Routes `fakeremote://<path>` to `root/<path>` in etils.epath and in orbax's
  TensorStore specs (idempotent; the last root wins)."""
  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath, register
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  os.makedirs(root, exist_ok=True)
  if PREFIX not in gpath._URI_PREFIXES:
    gpath._URI_PREFIXES += (PREFIX,)
    gpath._URI_SCHEMES = gpath._URI_SCHEMES | {SCHEME}
    gpath._URI_MAP_ROOT[PREFIX] = f"/{SCHEME}/"
    register._URI_PREFIXES_TO_CLS[PREFIX] = gpath.PosixGPath
    normalize = ts_utils._normalize_path

    def normalize_fake(path: str) -> str:
      path = os.fspath(path)
      if path.startswith(PREFIX):  # TensorStore's file driver needs the local folder
        return normalize(gpath._PREFIX_TO_BACKEND[SCHEME].local(path))
      return normalize(path)

    ts_utils._normalize_path = normalize_fake
  gpath._PREFIX_TO_BACKEND[SCHEME] = _backend_cls()(root)


def local_path(uri: str, root: str) -> str:
  """Where `fakeremote://<path>` is stored under `root`."""
  assert uri.startswith(PREFIX), uri
  return os.path.join(root, uri[len(PREFIX):])


if __name__ == "__main__":
  install(os.environ[ENV])
  from rft import main  # pylint: disable=g-import-not-at-top
  main.run()
