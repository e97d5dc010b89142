"""Metric writers, image grids, console progress and event-file reading.

Everything here is TensorFlow-free:

* The API is clu's ``MetricWriter`` interface. ``import clu.metric_writers``
  imports TensorFlow in its package ``__init__`` (for its ``SummaryWriter``),
  so when that import fails for want of TensorFlow we register a lightweight
  package module for ``clu.metric_writers`` and import only the TF-free
  submodules (``interface``, ``multi_writer``, ``logging_writer``,
  ``async_writer``) through it.
* :class:`TensorBoardWriter` writes real TensorBoard event files with
  tensorboardX.
* :func:`read_scalars` (in rft.tb_events, re-exported) reads event files back by parsing the TFRecord framing
  and the ``Event`` protobuf (tensorboardX ships the compiled protos).

Typical use::

  writer = create_writer(workdir)            # logs + TensorBoard on process 0
  writer.write_scalars(step, {"loss": loss})
  writer.write_images(step, {"samples": image_grid(x, prompts)[None]})
  bar = ProgressBar(total_steps, initial=start_step, desc="train")
  bar.update(step, loss=loss)
"""

from __future__ import annotations

import importlib
import importlib.machinery
import io
import math
import os
import time
import sys
import types
import wave
from typing import Any, List, Mapping, Optional, Sequence

from absl import logging
import jax
import numpy as np

from rft import paths

__all__ = [
    "MetricWriter",
    "MultiWriter",
    "LoggingWriter",
    "AsyncWriter",
    "NullWriter",
    "TensorBoardWriter",
    "create_writer",
    "image_grid",
    "save_image",
    "ProgressBar",
    "read_scalars",
    "iter_events",
    "load_clu_metric_writers",
]


# ----------------------------------------------------------------------------
# clu.metric_writers without TensorFlow
# ----------------------------------------------------------------------------

_TF_FREE_SUBMODULES = ("interface", "multi_writer", "logging_writer")
_OPTIONAL_SUBMODULES = ("async_writer",)


def load_clu_metric_writers() -> types.ModuleType:
  """Returns the ``clu.metric_writers`` package, importable without TensorFlow.

  Tries the normal import first. If it fails because TensorFlow is missing,
  registers a bare package module for ``clu.metric_writers`` (its ``__path__``
  pointing at the installed folder, so submodules resolve normally) and imports
  the TF-free submodules through it. The returned package exposes
  ``MetricWriter``, ``MultiWriter``, ``LoggingWriter`` (and ``AsyncWriter``,
  ``AsyncMultiWriter``, ``ensure_flushes`` when ``async_writer``'s deps import).
  """
  try:
    import clu.metric_writers as mw  # pylint: disable=g-import-not-at-top
    return mw
  except ImportError as e:
    if "tensorflow" not in str(e).lower():
      raise
  existing = sys.modules.get("clu.metric_writers")
  if existing is not None and getattr(existing, "_rft_lightweight", False):
    return existing

  import clu  # pylint: disable=g-import-not-at-top
  folder = os.path.join(os.path.dirname(os.path.abspath(clu.__file__)),
                        "metric_writers")
  if not os.path.isdir(folder):
    raise ImportError(f"clu.metric_writers folder not found at {folder}")
  pkg = types.ModuleType("clu.metric_writers")
  pkg.__path__ = [folder]
  pkg.__file__ = os.path.join(folder, "__init__.py")
  pkg.__package__ = "clu.metric_writers"
  spec = importlib.machinery.ModuleSpec(
      "clu.metric_writers", loader=None, is_package=True)
  spec.submodule_search_locations = [folder]
  pkg.__spec__ = spec
  pkg.__doc__ = ("Lightweight clu.metric_writers registered by rft.metrics "
                 "(TensorFlow is not installed; SummaryWriter unavailable).")
  pkg._rft_lightweight = True  # pylint: disable=protected-access
  sys.modules["clu.metric_writers"] = pkg
  clu.metric_writers = pkg
  try:
    for name in _TF_FREE_SUBMODULES:
      setattr(pkg, name, importlib.import_module(f"clu.metric_writers.{name}"))
  except Exception:
    del sys.modules["clu.metric_writers"]
    raise
  for name in _OPTIONAL_SUBMODULES:
    try:
      setattr(pkg, name, importlib.import_module(f"clu.metric_writers.{name}"))
    except ImportError as e:  # pragma: no cover - depends on the install
      logging.info("clu.metric_writers.%s unavailable: %s", name, e)
  pkg.MetricWriter = pkg.interface.MetricWriter
  pkg.MultiWriter = pkg.multi_writer.MultiWriter
  pkg.LoggingWriter = pkg.logging_writer.LoggingWriter
  if hasattr(pkg, "async_writer"):
    pkg.AsyncWriter = pkg.async_writer.AsyncWriter
    pkg.AsyncMultiWriter = pkg.async_writer.AsyncMultiWriter
    pkg.ensure_flushes = pkg.async_writer.ensure_flushes
  return pkg


_mw = load_clu_metric_writers()
MetricWriter = _mw.MetricWriter
MultiWriter = _mw.MultiWriter
LoggingWriter = _mw.LoggingWriter
AsyncWriter = getattr(_mw, "AsyncWriter", None)

Array = Any
Scalar = Any


# ----------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------


def _to_float(value: Any, key: str) -> float:
  arr = np.asarray(jax.device_get(value))
  if arr.size != 1:
    raise ValueError(
        f"scalar {key!r} must hold exactly one value, got shape {arr.shape}")
  return float(arr.reshape(()))


def _to_uint8_image(image: Any, key: str) -> np.ndarray:
  """[H, W, C] uint8 or float in [0, 1] -> [H, W, C] uint8 (C in 1, 3, 4)."""
  arr = np.asarray(jax.device_get(image))
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image {key!r} must be [H, W, C] with C in (1, 3, 4), "
                     f"got shape {arr.shape}")
  if arr.dtype == np.uint8:
    return arr
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"image {key!r}: unsupported dtype {arr.dtype}")
  arr = np.nan_to_num(arr.astype(np.float32), nan=0.0)
  return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


class NullWriter(MetricWriter):
  """A MetricWriter that writes nothing (used on processes other than 0)."""

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_scalars(self, step, scalars):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


class TensorBoardWriter(MetricWriter):
  """A clu ``MetricWriter`` writing TensorBoard event files via tensorboardX.

  Values may be Python numbers, numpy scalars/arrays or jax arrays. Scalars are
  stored as ``simple_value`` (float32 precision, as in TensorBoard).
  Images are [H, W, C] or [N, H, W, C], uint8 or float in [0, 1]; with N > 1
  image ``i`` is written under tag ``f"{key}/{i}"``.
  """

  _opened = 0  # writers opened by this process (a unique file name each)

  def __init__(self, logdir: str, *, flush_secs: int = 30,
               max_queue: int = 100):
    # Imported here so that merely importing rft.metrics stays cheap.
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import tensor_pb2  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import tensor_shape_pb2  # pylint: disable=g-import-not-at-top
    self._pb_summary = summary_pb2
    self._pb_tensor = tensor_pb2
    self._pb_shape = tensor_shape_pb2
    self.logdir = os.fspath(logdir)
    paths.makedirs(self.logdir)
    if not paths.is_local(self.logdir):  # tensorboardX's own gs:// and s3:// writers need
      _route_event_files(self.logdir)    # google-cloud-storage / boto3: epath instead
    # tensorboardX names files by the second and opens them with "wb": a second writer
    # on the same folder within that second (a fast restart) would overwrite the first.
    TensorBoardWriter._opened += 1
    self._writer = SummaryWriter(logdir=self.logdir, flush_secs=flush_secs,
                                 max_queue=max_queue,
                                 filename_suffix=f".{os.getpid()}.{TensorBoardWriter._opened}")
    # tensorboardX queues events for a background thread and its flush() does not drain
    # that queue, so points written just before a checkpoint could still be in memory when
    # a kill came (measured: a step missing after a resume). Events are written in the
    # calling thread instead (buffered; flushed every `flush_secs` and by `flush()`), so
    # `flush()` means on disk.
    events = self._writer._get_file_writer().event_writer  # pylint: disable=protected-access
    records = events._ev_writer  # pylint: disable=protected-access
    last_flush = [time.time()]

    def write_now(event):
      records.write_event(event)
      if time.time() - last_flush[0] >= flush_secs:
        records.flush()
        last_flush[0] = time.time()

    events.add_event = write_now
    self._closed = False

  # -- helpers ---------------------------------------------------------------

  def _add(self, summary, step: Optional[int]):
    self._writer._get_file_writer().add_summary(  # pylint: disable=protected-access
        summary, None if step is None else int(step))

  def _text_summary(self, tag: str, text: str):
    pb = self._pb_summary
    from tensorboardX.proto.plugin_text_pb2 import TextPluginData  # pylint: disable=g-import-not-at-top
    meta = pb.SummaryMetadata(plugin_data=pb.SummaryMetadata.PluginData(
        plugin_name="text", content=TextPluginData(version=0).SerializeToString()))
    tensor = self._pb_tensor.TensorProto(
        dtype="DT_STRING", string_val=[text.encode("utf-8")],
        tensor_shape=self._pb_shape.TensorShapeProto(
            dim=[self._pb_shape.TensorShapeProto.Dim(size=1)]))
    return pb.Summary(value=[pb.Summary.Value(tag=tag, metadata=meta,
                                              tensor=tensor)])

  # -- MetricWriter ----------------------------------------------------------

  def write_summaries(self, step: int, values: Mapping[str, Array],
                      metadata: Optional[Mapping[str, Any]] = None):
    """Writes raw tensors; ``metadata[key]`` may be a SummaryMetadata or bytes."""
    pb = self._pb_summary
    metadata = metadata or {}
    for key, value in values.items():
      arr = np.asarray(jax.device_get(value))
      tensor = _make_tensor_proto(arr, self._pb_tensor, self._pb_shape)
      kwargs = {}
      meta = metadata.get(key)
      if meta is not None:
        if isinstance(meta, (bytes, bytearray)):
          meta = pb.SummaryMetadata.FromString(bytes(meta))
        kwargs["metadata"] = meta
      self._add(pb.Summary(value=[pb.Summary.Value(tag=key, tensor=tensor,
                                                   **kwargs)]), step)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]):
    pb = self._pb_summary
    values = [pb.Summary.Value(tag=k, simple_value=_to_float(v, k))
              for k, v in scalars.items()]
    if values:
      self._add(pb.Summary(value=values), step)

  def write_images(self, step: int, images: Mapping[str, Array]):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    pb = self._pb_summary
    for key, value in images.items():
      arr = np.asarray(jax.device_get(value))
      if arr.ndim == 4:
        batch = list(arr)
        tags = [key] if len(batch) == 1 else [f"{key}/{i}"
                                              for i in range(len(batch))]
      else:
        batch, tags = [arr], [key]
      for tag, img in zip(tags, batch):
        img = _to_uint8_image(img, key)
        h, w, c = img.shape
        pil = Image.fromarray(img[..., 0] if c == 1 else img)
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        im = pb.Summary.Image(height=h, width=w, colorspace=c,
                              encoded_image_string=buf.getvalue())
        self._add(pb.Summary(value=[pb.Summary.Value(tag=tag, image=im)]),
                  step)

  def write_videos(self, step: int, videos: Mapping[str, Array]):
    raise NotImplementedError(
        "TensorBoardWriter.write_videos is not supported (tensorboardX needs "
        "moviepy for videos); log frames with write_images or an image_grid.")

  def write_audios(self, step: int, audios: Mapping[str, Array], *,
                   sample_rate: int):
    """Audios [N, T, C] or [T, C] float in [-1, 1], encoded as 16-bit WAV."""
    pb = self._pb_summary
    for key, value in audios.items():
      arr = np.asarray(jax.device_get(value), dtype=np.float32)
      if arr.ndim == 1:
        arr = arr[:, None]
      if arr.ndim == 2:
        arr = arr[None]
      if arr.ndim != 3:
        raise ValueError(f"audio {key!r} must be [N, T, C], got {arr.shape}")
      for i, clip in enumerate(arr):
        pcm = (np.clip(np.nan_to_num(clip), -1, 1) * 32767).astype("<i2")
        buf = io.BytesIO()
        with wave.open(buf, "wb") as wav:
          wav.setnchannels(clip.shape[1])
          wav.setsampwidth(2)
          wav.setframerate(int(sample_rate))
          wav.writeframes(pcm.tobytes())
        au = pb.Summary.Audio(sample_rate=float(sample_rate),
                              num_channels=clip.shape[1],
                              length_frames=clip.shape[0],
                              encoded_audio_string=buf.getvalue(),
                              content_type="audio/wav")
        tag = key if arr.shape[0] == 1 else f"{key}/{i}"
        self._add(pb.Summary(value=[pb.Summary.Value(tag=tag, audio=au)]),
                  step)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, text in texts.items():
      self._add(self._text_summary(key, str(text)), step)

  def write_histograms(self, step: int, arrays: Mapping[str, Array],
                       num_buckets: Optional[Mapping[str, int]] = None):
    num_buckets = num_buckets or {}
    for key, value in arrays.items():
      arr = np.asarray(jax.device_get(value), dtype=np.float64).reshape(-1)
      finite = arr[np.isfinite(arr)]
      if finite.size < arr.size:
        logging.warning("histogram %r at step %d: dropped %d non-finite values",
                        key, step, arr.size - finite.size)
      if finite.size == 0:
        continue
      self._writer.add_histogram(key, finite, global_step=int(step),
                                 bins=int(num_buckets.get(key, 30)))

  def write_hparams(self, hparams: Mapping[str, Any]):
    """Writes hparams for TensorBoard's HParams plugin and as a text table.

    Numbers, bools and strings are kept; other values are written as strings.
    """
    from tensorboardX.summary import hparams as hparams_summary  # pylint: disable=g-import-not-at-top
    clean = {}
    for k, v in hparams.items():
      if isinstance(v, (np.generic, jax.Array)) and np.ndim(v) == 0:
        v = np.asarray(v).item()
      if not isinstance(v, (bool, int, float, str)):
        v = str(v)
      clean[str(k)] = v
    exp, ssi, sei = hparams_summary(clean, {})
    for s in (exp, ssi, sei):
      self._add(s, 0)
    lines = ["| name | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(clean.items())]
    self._add(self._text_summary("hparams", "\n".join(lines)), 0)

  def flush(self):
    if not self._closed:
      self._writer.flush()

  def close(self):
    if not self._closed:
      self._writer.close()
      self._closed = True


class _EpathEventFile:
  """A TensorBoard event file on a non-local filesystem, written through rft.paths: the
  records are kept in memory and `flush()` writes the whole file (an object in gs:// or
  s3:// cannot be appended to), so after `flush()` it holds every record written."""

  def __init__(self, path: str):
    self._path = path
    self._buffer = io.BytesIO()
    self._written = -1  # buffer size at the last write of the file

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    if self._buffer.tell() != self._written:
      paths.write_bytes(self._path, self._buffer.getvalue())
      self._written = self._buffer.tell()

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """tensorboardX writer factory (``record_writer.register_writer_factory``) for one URI
  scheme: event files through :class:`_EpathEventFile`."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    paths.makedirs(path)


def _route_event_files(logdir: str) -> None:
  """Makes tensorboardX open event files under `logdir`'s scheme (gs, s3, ...) with
  :class:`_EpathEventFiles` (it picks a factory by the text before the first ':')."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  scheme = logdir.split(":", 1)[0]
  if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _EpathEventFiles):
    record_writer.register_writer_factory(scheme, _EpathEventFiles())


def _make_tensor_proto(arr: np.ndarray, tensor_pb2, shape_pb2):
  dtypes = {
      np.dtype(np.float16): "DT_HALF", np.dtype(np.float32): "DT_FLOAT",
      np.dtype(np.float64): "DT_DOUBLE", np.dtype(np.int8): "DT_INT8",
      np.dtype(np.int16): "DT_INT16", np.dtype(np.int32): "DT_INT32",
      np.dtype(np.int64): "DT_INT64", np.dtype(np.uint8): "DT_UINT8",
      np.dtype(np.uint16): "DT_UINT16", np.dtype(np.uint32): "DT_UINT32",
      np.dtype(np.uint64): "DT_UINT64", np.dtype(np.bool_): "DT_BOOL",
  }
  shape = shape_pb2.TensorShapeProto(
      dim=[shape_pb2.TensorShapeProto.Dim(size=d) for d in arr.shape])
  if arr.dtype.kind in ("U", "S", "O"):
    flat = [x.encode("utf-8") if isinstance(x, str) else bytes(x)
            for x in arr.reshape(-1).tolist()]
    return tensor_pb2.TensorProto(dtype="DT_STRING", tensor_shape=shape,
                                  string_val=flat)
  if arr.dtype not in dtypes:
    raise ValueError(f"unsupported summary tensor dtype {arr.dtype}")
  return tensor_pb2.TensorProto(
      dtype=dtypes[arr.dtype], tensor_shape=shape,
      tensor_content=np.ascontiguousarray(arr).astype(
          arr.dtype.newbyteorder("<")).tobytes())


class _LoggingWriter(LoggingWriter):
  """LoggingWriter printing jax/numpy scalars as plain numbers."""

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]):
    super().write_scalars(step, {k: _to_float(v, k) for k, v in scalars.items()})


def create_writer(workdir: str, *, is_main: Optional[bool] = None,
                  resume_step: Optional[int] = None) -> MetricWriter:
  """The metric writer for a run.

  On the main process (``jax.process_index() == 0`` unless ``is_main`` is
  given): a MultiWriter of a LoggingWriter (absl INFO lines) and a
  TensorBoardWriter on ``workdir``. Elsewhere a writer that writes nothing.

  ``resume_step``: the step (epoch) the run starts from. Points an earlier run of the
  workdir logged after it are dropped first (``tb_events.trim_after``), because the
  resumed run logs them again: every step appears once in the curves.
  """
  if is_main is None:
    is_main = jax.process_index() == 0
  if not is_main:
    return NullWriter()
  if resume_step is not None:
    from rft import tb_events  # pylint: disable=g-import-not-at-top
    trimmed = tb_events.trim_after(workdir, resume_step)
    if trimmed:
      logging.info("TensorBoard: dropped %d points logged after step %d (logged again now)",
                   sum(trimmed.values()), resume_step)
  return MultiWriter([_LoggingWriter(), TensorBoardWriter(workdir)])


# ----------------------------------------------------------------------------
# Image grids
# ----------------------------------------------------------------------------


def _to_uint8_batch(images: Any) -> np.ndarray:
  arr = np.asarray(jax.device_get(images))
  if arr.ndim == 3:
    arr = arr[..., None]
  if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(
        f"images must be [N, H, W, C] with C in (1, 3, 4), got {arr.shape}")
  if arr.dtype != np.uint8:
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0)
    arr = np.round((np.clip(arr, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  elif arr.shape[-1] == 4:
    arr = arr[..., :3]
  return arr


def _wrap_text(text: str, width_px: int, measure, max_lines: int) -> List[str]:
  """Greedy word wrap by rendered width; long words are split; '..' if cut."""
  words = text.split()
  lines: List[str] = []
  cur = ""
  for word in words:
    cand = word if not cur else f"{cur} {word}"
    if measure(cand) <= width_px:
      cur = cand
      continue
    if cur:
      lines.append(cur)
    cur = ""
    while measure(word) > width_px and len(word) > 1:
      # Longest prefix that fits (at least one character).
      k = len(word) - 1
      while k > 1 and measure(word[:k]) > width_px:
        k -= 1
      lines.append(word[:k])
      word = word[k:]
    cur = word
  if cur:
    lines.append(cur)
  if len(lines) > max_lines:
    last = lines[max_lines - 1]
    while last and measure(last + "..") > width_px:
      last = last[:-1]
    lines = lines[:max_lines - 1] + [last + ".."]
  return lines


def image_grid(images: Any, captions: Optional[Sequence[str]] = None,
               ncols: int = 8, scale: int = 4, *, max_caption_lines: int = 3,
               gap: int = 2) -> np.ndarray:
  """Tiles images into one uint8 [H', W', 3] grid, captions under each tile.

  Args:
    images: [N, H, W, C] float in [-1, 1] or uint8 (C in 1, 3, 4).
    captions: optional N strings drawn in small text below each image, wrapped
      to the tile width, at most ``max_caption_lines`` lines.
    ncols: tiles per row (fewer if N < ncols).
    scale: nearest-neighbour upscaling factor of each image.
    gap: pixels between tiles and around the border (white).

  Layout: tile (r, c) has its image at
  ``y = gap + r * (H*scale + caption_h + gap)``, ``x = gap + c * (W*scale + gap)``
  where ``caption_h`` is 0 without captions.
  """
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  arr = _to_uint8_batch(images)
  n, h, w, _ = arr.shape
  if n == 0:
    raise ValueError("image_grid needs at least one image")
  if captions is not None and len(captions) != n:
    raise ValueError(f"got {len(captions)} captions for {n} images")
  scale = max(int(scale), 1)
  ncols = max(1, min(int(ncols), n))
  nrows = math.ceil(n / ncols)
  th, tw = h * scale, w * scale
  tiles = arr.repeat(scale, axis=1).repeat(scale, axis=2)

  font = ImageFont.load_default()
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

  def measure(s: str) -> int:
    left, _, right, _ = probe.textbbox((0, 0), s, font=font)
    return right - left

  wrapped: List[List[str]] = []
  line_h = 0
  cap_h = 0
  if captions is not None:
    _, top, _, bottom = probe.textbbox((0, 0), "Ag|", font=font)
    line_h = bottom - min(top, 0) + 1
    wrapped = [_wrap_text(str(c), tw, measure, max_caption_lines)
               for c in captions]
    nlines = max((len(x) for x in wrapped), default=0)
    cap_h = nlines * line_h + (1 if nlines else 0)

  gh = gap + nrows * (th + cap_h + gap)
  gw = gap + ncols * (tw + gap)
  grid = np.full((gh, gw, 3), 255, np.uint8)
  for i in range(n):
    r, c = divmod(i, ncols)
    y, x = gap + r * (th + cap_h + gap), gap + c * (tw + gap)
    grid[y:y + th, x:x + tw] = tiles[i]
  if captions is not None and cap_h:
    pil = Image.fromarray(grid)
    draw = ImageDraw.Draw(pil)
    for i, lines in enumerate(wrapped):
      r, c = divmod(i, ncols)
      y, x = gap + r * (th + cap_h + gap) + th + 1, gap + c * (tw + gap)
      for j, line in enumerate(lines):
        draw.text((x, y + j * line_h), line, fill=(0, 0, 0), font=font)
    # Text must not spill onto image tiles: restore them exactly.
    grid = np.array(pil)
    for i in range(n):
      r, c = divmod(i, ncols)
      y, x = gap + r * (th + cap_h + gap), gap + c * (tw + gap)
      grid[y:y + th, x:x + tw] = tiles[i]
  return grid


def save_image(path: str, grid: Any) -> None:
  """Saves a uint8 [H, W, 3] (or [H, W]) array as a PNG file, local or not (parents
  created; rft.paths.write_png)."""
  arr = np.asarray(jax.device_get(grid))
  if arr.dtype != np.uint8:
    raise ValueError(f"save_image expects uint8, got {arr.dtype}; "
                     "use image_grid() to convert")
  paths.write_png(path, arr)


# ----------------------------------------------------------------------------
# Console progress
# ----------------------------------------------------------------------------


class ProgressBar:
  """Console progress (tqdm): step/total, steps/s and ETA, a few scalars.

  ``update(step, **scalars)`` takes the *absolute* step. Resuming at
  ``initial=k`` shows ``k/total`` and computes rate/ETA only from the steps
  done in this run. Disabled on processes other than 0 (or with
  ``disable=True``).
  """

  def __init__(self, total: int, initial: int = 0, desc: str = "train", *,
               disable: Optional[bool] = None, max_postfix: int = 4, **kwargs):
    import tqdm  # pylint: disable=g-import-not-at-top
    if disable is None:
      disable = jax.process_index() != 0
    self.max_postfix = max_postfix
    self._bar = tqdm.tqdm(total=int(total), initial=int(initial), desc=desc,
                          disable=disable, dynamic_ncols=True,
                          unit="step", smoothing=0.1, **kwargs)
    self.initial = int(initial)

  @property
  def n(self) -> int:
    return self._bar.n

  @property
  def bar(self):
    return self._bar

  def update(self, step: int, **scalars: Any) -> None:
    step = int(step)
    if scalars and not self._bar.disable:
      post = {}
      for k, v in list(scalars.items())[:self.max_postfix]:
        try:
          post[k] = f"{_to_float(v, k):.4g}"
        except (TypeError, ValueError):
          post[k] = str(v)
      self._bar.set_postfix(post, refresh=False)
    delta = step - self._bar.n
    if delta > 0:
      self._bar.update(delta)
    elif delta < 0:  # steps went backwards (e.g. a restart): just show it
      self._bar.n = step
      self._bar.refresh()
    elif scalars:
      self._bar.refresh()

  def write(self, msg: str) -> None:
    """Prints a line without breaking the bar."""
    if not self._bar.disable:
      self._bar.write(msg)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


from rft.tb_events import iter_events, read_scalars  # noqa: E402,F401  (re-exported)
