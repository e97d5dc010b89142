"""Reading TensorBoard event files back without TensorFlow (TFRecord framing + Event protos).

Used by tests and result scripts: `read_scalars(logdir)` -> {tag: [(step, value)]},
`read_hparams(logdir)` -> the hyperparameters and metric columns of the HParams dashboard,
`read_images(logdir)` -> {tag: [(step, uint8 image)]}.
`trim_after(logdir, step)` is what a resumed run calls before it logs again: points
written after the checkpoint it resumes from are dropped (the run logs them again), so a
curve holds every step once, and a record cut short by a kill is removed.
Log folders may be local or not (gs://...): files are read and written through rft.paths.
"""
from __future__ import annotations

import os
import struct
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from rft import paths

_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
  from tensorboardX.crc32c import crc32c  # pylint: disable=g-import-not-at-top
  x = crc32c(data) & 0xFFFFFFFF
  return (((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _iter_records(path: str, verify_crc: bool = True, status: Optional[dict] = None):
  """Yields the payloads of a TFRecord file; a truncated tail is ignored (and noted in
  `status["truncated"]` when a dict is given)."""
  status = {} if status is None else status
  status["truncated"] = False
  with paths.path(path).open("rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        status["truncated"] = bool(header)
        return  # EOF or a record still being written
      (length,), (len_crc,) = (struct.unpack("<Q", header[:8]),
                               struct.unpack("<I", header[8:]))
      if _masked_crc(header[:8]) != len_crc:
        raise ValueError(f"{path}: corrupt record length at offset "
                         f"{f.tell() - 12}")
      data = f.read(length)
      footer = f.read(4)
      if len(data) < length or len(footer) < 4:
        status["truncated"] = True
        return
      if verify_crc and _masked_crc(data) != struct.unpack("<I", footer)[0]:
        raise ValueError(f"{path}: corrupt record data at offset "
                         f"{f.tell() - 4 - length}")
      yield data


def _event_files(logdir: str) -> List[str]:
  d = paths.path(logdir)
  if d.is_file():
    return [os.fspath(logdir)]
  if not d.is_dir():
    raise FileNotFoundError(f"no such log directory: {logdir}")
  return sorted((os.fspath(f) for f in d.iterdir() if "tfevents" in f.name and f.is_file()),
                key=_name_order)


def _name_order(path: str):
  """Sort key of an event file: its name with every run of digits compared as a number.
  Names are events.out.tfevents.<unix time>.<host>.<pid>.<writer count>; two files made
  in the same second differ in pid or count, and "….10" must sort after "….9"."""
  import re  # pylint: disable=g-import-not-at-top
  return [(0, int(t), "") if t.isdigit() else (1, 0, t)
          for t in re.split(r"(\d+)", os.path.basename(path))]


def iter_events(logdir: str, verify_crc: bool = True):
  """Yields ``Event`` protos from the event files directly in ``logdir``
  (or from one event file), oldest file first."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  for path in _event_files(logdir):
    for data in _iter_records(path, verify_crc):
      yield event_pb2.Event.FromString(data)


_TENSOR_DTYPES = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16,
    6: np.int8, 9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16,
    22: np.uint32, 23: np.uint64,
}


def _tensor_scalar(tensor) -> Optional[float]:
  """The value of a numeric one-element TensorProto, else None."""
  dtype = _TENSOR_DTYPES.get(tensor.dtype)
  if dtype is None:
    return None
  dims = [d.size for d in tensor.tensor_shape.dim]
  if int(np.prod(dims)) != 1:
    return None
  if tensor.tensor_content:
    arr = np.frombuffer(tensor.tensor_content, dtype=np.dtype(dtype).newbyteorder("<"))
    return float(arr.reshape(-1)[0]) if arr.size else None
  for field in ("float_val", "double_val", "int_val", "int64_val", "bool_val",
                "uint32_val", "uint64_val"):
    vals = getattr(tensor, field, None)
    if vals:
      return float(vals[0])
  if tensor.half_val:  # float16 bits stored in int32s
    return float(np.array(tensor.half_val[0], np.uint16).view(np.float16))
  return None


def read_scalars(logdir: str, *, verify_crc: bool = True
                 ) -> Dict[str, List[Tuple[int, float]]]:
  """Reads the scalars of the TensorBoard event files in ``logdir``.

  Returns ``{tag: [(step, value), ...]}`` in write order (files by name, i.e.
  by creation time). Both ``simple_value`` scalars (tensorboardX, TF1) and
  tensor-encoded scalars (TF2 ``tf.summary.scalar``: plugin ``scalars``, the
  plugin name possibly only on a tag's first event) are read. Only files
  directly in ``logdir`` are read (pass a subfolder for another run).
  """
  out: Dict[str, List[Tuple[int, float]]] = {}
  plugin_of: Dict[str, str] = {}
  for event in iter_events(logdir, verify_crc=verify_crc):
    if not event.HasField("summary"):
      continue
    for value in event.summary.value:
      tag = value.tag
      if value.HasField("metadata") and value.metadata.plugin_data.plugin_name:
        plugin_of.setdefault(tag, value.metadata.plugin_data.plugin_name)
      kind = value.WhichOneof("value")
      if kind == "simple_value":
        out.setdefault(tag, []).append((int(event.step),
                                        float(value.simple_value)))
      elif kind == "tensor" and plugin_of.get(tag, "scalars") == "scalars":
        v = _tensor_scalar(value.tensor)
        if v is not None:
          out.setdefault(tag, []).append((int(event.step), v))
  return out



def read_hparams(logdir: str) -> Dict[str, Any]:
  """What TensorBoard's HParams dashboard reads from the event files in ``logdir``:
  ``{"hparams": {name: value}, "metrics": [metric column tags]}`` from the session-start
  and experiment summaries (the last ones written); empty when there are none."""
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData  # pylint: disable=g-import-not-at-top
  out: Dict[str, Any] = {"hparams": {}, "metrics": []}
  for event in iter_events(logdir):
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name != "hparams":
        continue
      data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
      if data.HasField("session_start_info"):
        out["hparams"] = {k: getattr(v, v.WhichOneof("kind"))
                          for k, v in data.session_start_info.hparams.items()}
      if data.HasField("experiment"):
        out["metrics"] = [m.name.tag for m in data.experiment.metric_infos]
  return out


def read_images(logdir: str) -> Dict[str, List[Tuple[int, np.ndarray]]]:
  """{tag: [(step, uint8 [H, W, C] image), ...]} of the image summaries in ``logdir``."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out: Dict[str, List[Tuple[int, np.ndarray]]] = {}
  for event in iter_events(logdir):
    for value in event.summary.value:
      if value.WhichOneof("value") == "image":
        img = np.array(Image.open(io.BytesIO(value.image.encoded_image_string)))
        out.setdefault(value.tag, []).append((int(event.step), img))
  return out


def read_texts(logdir: str) -> Dict[str, List[Tuple[int, str]]]:
  """{tag: [(step, text), ...]} of the text summaries (plugin "text") in ``logdir``."""
  out: Dict[str, List[Tuple[int, str]]] = {}
  for event in iter_events(logdir):
    for value in event.summary.value:
      if (value.metadata.plugin_data.plugin_name == "text"
          and value.WhichOneof("value") == "tensor"):
        text = b"".join(value.tensor.string_val).decode("utf-8")
        out.setdefault(value.tag, []).append((int(event.step), text))
  return out


def _frame(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data
          + struct.pack("<I", _masked_crc(data)))


def trim_after(logdir: str, step: int) -> Dict[str, int]:
  """Drops, from the event files directly in `logdir`, every event logged at a step after
  `step` (and, for `step` <= 0, every summary: a run resumed from nothing logs its step 0
  again), plus a record cut short at a file's end. Files that need no change are left
  untouched; the others are rewritten whole, all or nothing (rft.paths.write_bytes).
  Returns {file name: events dropped} for the files it rewrote."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  if not paths.path(logdir).is_dir():
    return {}
  changed = {}
  for path in _event_files(logdir):
    kept, dropped, status = [], 0, {}
    for data in _iter_records(path, verify_crc=False, status=status):
      event = event_pb2.Event.FromString(data)
      late = event.step > step if step > 0 else event.HasField("summary")
      if late and not event.HasField("file_version"):
        dropped += 1
      else:
        kept.append(data)
    if not dropped and not status["truncated"]:
      continue
    paths.write_bytes(path, b"".join(_frame(data) for data in kept))
    changed[os.path.basename(path)] = dropped
  return changed
