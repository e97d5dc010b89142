"""Files in a workdir, local or not (`gs://bucket/run`, `s3://...`): every file rft writes
or reads in a workdir goes through `etils.epath.Path`.

Local paths use the os functions, as before. `gs://` (and `s3://`, ...) goes through
tf.io.gfile when TensorFlow is installed, else fsspec (needs `gcsfs` for gs://); orbax's
checkpoints take the same paths (their array files through TensorStore's own GCS driver).
Workdirs stay strings in the code (messages, `f"{workdir}/checkpoints"`); `path(p)` turns
one into an `epath.Path` where a file is touched.

Whole-file writes (`write_bytes`, `write_text`, `write_json`) are all-or-nothing: locally a
temporary file in the same folder, then a rename over the target; elsewhere one write (an
object store's upload appears whole or not at all, and a rename there is a copy).
`append_text` appends locally and reads then rewrites elsewhere (objects cannot be
appended to).
"""
from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def path(p: PathLike) -> epath.Path:
  """`p` as an `etils.epath.Path` (local, gs://, s3://, ...)."""
  return epath.Path(p)


def is_local(p: PathLike) -> bool:
  """Whether `p` is a local path (no `scheme://` prefix)."""
  return "://" not in os.fspath(p)


def makedirs(p: PathLike) -> epath.Path:
  """Creates folder `p` and its parents (no error when it exists); returns it."""
  d = path(p)
  d.mkdir(parents=True, exist_ok=True)
  return d


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes the whole file `p` (parent folders created), all or nothing (module doc)."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(target):
    target.write_bytes(data)
    return
  # The temporary name must not contain the target's: a half-written
  # "events.out.tfevents.*.tmp" would be read as an event file (by tb_events and TensorBoard).
  tmp = target.parent / f".rft-partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.write_bytes(data)
  tmp.replace(target)


def write_text(p: PathLike, text: str) -> None:
  """`write_bytes` of `text` as UTF-8."""
  write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any, **dumps_kwargs) -> None:
  """`write_text` of `json.dumps(obj, **dumps_kwargs)`."""
  write_text(p, json.dumps(obj, **dumps_kwargs))


def append_text(p: PathLike, text: str) -> None:
  """Appends `text` to file `p` (created when absent): in place locally, elsewhere a
  read and a rewrite of the whole file."""
  target = path(p)
  if is_local(target):
    with target.open("a") as f:
      f.write(text)
    return
  old = target.read_text() if target.exists() else ""
  write_text(target, old + text)


def read_json(p: PathLike) -> Any:
  """The JSON value in file `p`."""
  return json.loads(path(p).read_text())


def write_png(p: PathLike, image: Any) -> None:
  """Writes a PIL image (or a uint8 [H, W(, C)] array) as a PNG file `p` (`write_bytes`)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not isinstance(image, Image.Image):
    image = Image.fromarray(image)
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  write_bytes(p, buf.getvalue())
