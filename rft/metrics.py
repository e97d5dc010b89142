"""TensorBoard writing and console progress, without TensorFlow.

* :class:`TensorBoardWriter` is a thin layer over tensorboardX's ``SummaryWriter``
  (``add_scalar``, ``add_image``, ``add_text``, ``add_histogram`` and its ``hparams``
  summaries), with one difference: events are written in the calling thread, so that
  ``flush()`` means on disk (see the class). On processes other than 0,
  :func:`create_writer` gives a :class:`NullWriter`.
* :func:`flatten_hparams` turns a (nested) config into the ``{"objective.beta": 0.1, ...}``
  values TensorBoard's HParams dashboard can show.
* The image grids these writers log are drawn by rft.image_grids.
* :class:`ProgressBar`: a tqdm bar on a terminal, with log lines written above it; plain
  periodic progress lines when the output is a file (SLURM).
* :func:`read_scalars` / :func:`iter_events` (rft.tb_events, re-exported) read event
  files back.

Typical use::

  writer = create_writer(workdir)            # TensorBoard on process 0
  writer.write_hparams(config, metrics=["eval/heldout/alignment"])
  writer.write_scalars(step, {"train/loss": loss})
  writer.write_images(step, {"samples/heldout": image_grids.image_grid(x, prompts)})
  bar = ProgressBar(total_steps, initial=start_step, desc="train", unit="step")
  bar.update(step, loss=loss)
"""

from __future__ import annotations

import io
import logging as std_logging
import os
import sys
import time
from typing import Any, Dict, Mapping, Optional, Sequence

from absl import logging
import jax
import numpy as np

from rft import paths

__all__ = [
    "TensorBoardWriter",
    "NullWriter",
    "create_writer",
    "flatten_hparams",
    "ProgressBar",
    "read_scalars",
    "iter_events",
]

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


def _hparam_value(value: Any) -> Any:
  """A value TensorBoard's HParams plugin can hold (bool, int, float or str)."""
  if isinstance(value, (np.generic, jax.Array)) and np.ndim(value) == 0:
    value = np.asarray(value).item()
  if isinstance(value, (bool, int, float, str)):
    return value
  return str(value)  # None -> "None", lists / tuples -> "[1, 2]", objects -> their str


def flatten_hparams(config: Any, prefix: str = "") -> Dict[str, Any]:
  """A config (ConfigDict or nested mapping) as flat TensorBoard hparams.

  Nested blocks become dotted keys (``{"objective": {"beta": 0.1}}`` ->
  ``{"objective.beta": 0.1}``); bools, ints, floats and strings are kept, everything
  else is written as its ``str`` (``None`` -> ``"None"``, ``[16, 32]`` -> ``"[16, 32]"``);
  an empty block is ``"{}"``.
  """
  out: Dict[str, Any] = {}
  items = config.items() if hasattr(config, "items") else []
  for key, value in items:
    name = f"{prefix}{key}"
    if hasattr(value, "items") and not isinstance(value, (str, bytes)):
      nested = flatten_hparams(value, name + ".")
      out.update(nested if nested else {name: "{}"})
    else:
      out[name] = _hparam_value(value)
  return out


class NullWriter:
  """A writer with TensorBoardWriter's methods that writes nothing (processes other
  than 0)."""

  def write_scalars(self, step, scalars):
    pass

  def write_images(self, step, images):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams, metrics=()):
    pass

  def flush(self):
    pass

  def close(self):
    pass


class TensorBoardWriter:
  """TensorBoard event files in `logdir` through tensorboardX's ``SummaryWriter``.

  Values may be Python numbers, numpy scalars/arrays or jax arrays. Scalars are stored
  as ``simple_value`` (float32 precision, as in TensorBoard). Images are [H, W, C] or
  [N, H, W, C], uint8 or float in [0, 1]; with N > 1 image ``i`` is written under tag
  ``f"{key}/{i}"``.

  tensorboardX queues events for a background thread, and its ``flush()`` does not
  drain that queue, so points written just before a checkpoint could still be in
  memory when a kill came (measured: a step missing after a resume). Events are written
  in the calling thread instead (buffered; flushed every `flush_secs` and by
  ``flush()``), so ``flush()`` means on disk.
  """

  _opened = 0  # writers opened by this process (a unique file name each)

  def __init__(self, logdir: str, *, flush_secs: int = 30):
    # Imported here so that merely importing rft.metrics stays cheap.
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.logdir = os.fspath(logdir)
    paths.makedirs(self.logdir)
    if not paths.is_local(self.logdir):  # tensorboardX's own gs:// and s3:// writers need
      _route_event_files(self.logdir)    # google-cloud-storage / boto3: epath instead
    # tensorboardX names files by the second and opens them with "wb": a second writer
    # on the same folder within that second (a fast restart) would overwrite the first.
    TensorBoardWriter._opened += 1
    self._writer = SummaryWriter(logdir=self.logdir, flush_secs=flush_secs,
                                 filename_suffix=f".{os.getpid()}.{TensorBoardWriter._opened}")
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

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, _to_float(value, key), int(step))

  def write_images(self, step: int, images: Mapping[str, Array]):
    for key, value in images.items():
      arr = np.asarray(jax.device_get(value))
      batch = list(arr) if arr.ndim == 4 else [arr]
      tags = [key] if len(batch) == 1 else [f"{key}/{i}" for i in range(len(batch))]
      for tag, img in zip(tags, batch):
        self._writer.add_image(tag, _to_uint8_image(img, key), int(step), dataformats="HWC")

  def write_texts(self, step: int, texts: Mapping[str, str]):
    """Markdown texts under their own tags (tensorboardX's ``add_text`` would append
    "/text_summary" to each tag)."""
    from tensorboardX.summary import text as text_summary  # pylint: disable=g-import-not-at-top
    for key, text in texts.items():
      summary = text_summary(key, str(text))
      summary.value[0].tag = key
      self._add(summary, step)

  def _add(self, summary, step: int):
    self._writer._get_file_writer().add_summary(summary, int(step))  # pylint: disable=protected-access

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

  def write_hparams(self, hparams: Any, metrics: Sequence[str] = ()):
    """The run's hyperparameters for TensorBoard's HParams dashboard, and as a text table.

    `hparams`: a config or mapping, flattened with :func:`flatten_hparams`. `metrics`:
    the scalar tags shown as metric columns; TensorBoard fills a column with the last
    value the run logged under that tag, so they hold the final metrics (the latest ones
    while the run goes on).

    tensorboardX's ``add_hparams`` writes into a new timestamped subfolder, because it
    makes every call a session of its own and logs the metric values there; a run here
    is one session, so its experiment, session-start and session-end summaries
    (tensorboardX's ``hparams``) go into the run's own event file, at step 0, where
    TensorBoard reads the metric columns from the run's own scalars.
    """
    from tensorboardX.summary import hparams as hparams_summary  # pylint: disable=g-import-not-at-top
    flat = flatten_hparams(hparams)
    for summary in hparams_summary(flat, {tag: 0.0 for tag in metrics}):
      self._add(summary, 0)
    lines = ["| name | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(flat.items())]
    if metrics:
      lines += ["", "metric columns: " + ", ".join(metrics)]
    self.write_texts(0, {"hparams": "\n".join(lines)})

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



def create_writer(workdir: str, *, is_main: Optional[bool] = None,
                  resume_step: Optional[int] = None):
  """The metric writer of a run: a TensorBoardWriter on ``workdir`` on the main process
  (``jax.process_index() == 0`` unless ``is_main`` is given), a NullWriter elsewhere.

  Nothing is echoed to the console: the loops print one line per evaluation.

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
  return TensorBoardWriter(workdir)


# ----------------------------------------------------------------------------
# Console progress
# ----------------------------------------------------------------------------


class _AboveBar(io.TextIOBase):
  """A stream that writes through `tqdm.external_write_mode`: the bars on `stream` are
  cleared, the text written, the bars drawn again below it (log lines above the bar,
  never glued to it)."""

  def __init__(self, stream):
    super().__init__()
    self._stream = stream

  def write(self, s):
    import tqdm  # pylint: disable=g-import-not-at-top
    with tqdm.tqdm.external_write_mode(file=self._stream):
      self._stream.write(s)
    return len(s)

  def flush(self):
    self._stream.flush()

  def isatty(self):
    return self._stream.isatty()


def _console_handlers(stream) -> list:
  """The logging StreamHandlers (absl's included) that write to `stream`."""
  found = []
  for handler in std_logging.getLogger().handlers:
    inner = getattr(handler, "python_handler", handler)  # absl's ABSLHandler wraps one
    if isinstance(inner, std_logging.StreamHandler) and inner.stream is stream:
      found.append(inner)
  return found


def _is_tty(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


class ProgressBar:
  """Console progress of a loop: `unit`s done / total, time per unit, ETA, a few scalars.

  On a terminal: a tqdm bar, and while it is open the log lines that go to the same
  stream (absl's handler, other StreamHandlers) are written above it. When the stream
  is not a terminal (a SLURM log, a pipe): no bar and no carriage returns, but one
  plain log line (``prdp: epoch 12/40 (30%), 25.1 s/epoch, 11:40 left, reward=0.41``)
  at the first update, then at most every `line_every_secs` seconds, and at the end.

  ``update(step, **scalars)`` takes the *absolute* step. Resuming at ``initial=k``
  shows ``k/total`` and computes rate/ETA only from the steps done in this run.
  Disabled on processes other than 0 (or with ``disable=True``).
  """

  def __init__(self, total: int, initial: int = 0, desc: str = "train", *,
               unit: str = "step", disable: Optional[bool] = None, max_postfix: int = 4,
               file=None, interactive: Optional[bool] = None,
               line_every_secs: float = 60.0, **kwargs):
    import tqdm  # pylint: disable=g-import-not-at-top
    if disable is None:
      disable = jax.process_index() != 0
    self.disabled = bool(disable)
    self.max_postfix = max_postfix
    self.unit, self.desc, self.total = unit, desc, int(total)
    self.initial = int(initial)
    self.file = sys.stderr if file is None else file
    self.interactive = _is_tty(self.file) if interactive is None else bool(interactive)
    self.line_every_secs = float(line_every_secs)
    # Without a terminal the bar draws into a sink: it still keeps count, rate and
    # postfix, and the plain lines are written from them.
    self._bar = tqdm.tqdm(total=self.total, initial=self.initial, desc=desc,
                          disable=self.disabled,
                          file=self.file if self.interactive else io.StringIO(),
                          dynamic_ncols=self.interactive, unit=unit, smoothing=0.1,
                          **kwargs)
    self._t0 = time.time()
    self._last_line: Optional[float] = None
    self._redirected = []
    if self.interactive and not self.disabled:
      for handler in _console_handlers(self.file):
        self._redirected.append((handler, handler.stream))
        handler.stream = _AboveBar(handler.stream)

  @property
  def n(self) -> int:
    return self._bar.n

  @property
  def bar(self):
    return self._bar

  def update(self, step: int, **scalars: Any) -> None:
    step = int(step)
    if self.disabled:
      return
    if scalars:
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
    if not self.interactive:
      now = time.time()
      if (self._last_line is None or step >= self.total
          or now - self._last_line >= self.line_every_secs):
        self._last_line = now
        logging.info("%s", self.line())

  def line(self) -> str:
    """The plain progress line: ``desc: unit n/total (p%), s/unit, time left, postfix``."""
    import tqdm  # pylint: disable=g-import-not-at-top
    n, total = self._bar.n, self.total
    parts = [f"{self.desc}: {self.unit} {n}/{total} ({100 * n / max(total, 1):.0f}%)"]
    done = n - self.initial
    if done > 0:
      per = (time.time() - self._t0) / done
      parts.append(f"{per:.3g} s/{self.unit}")
      if n < total:
        parts.append(f"{tqdm.tqdm.format_interval(per * (total - n))} left")
    postfix = self._bar.postfix
    if postfix:
      parts.append(str(postfix))
    return ", ".join(parts)

  def write(self, msg: str) -> None:
    """Prints a line without breaking the bar."""
    if not self.disabled:
      if self.interactive:
        self._bar.write(msg, file=self.file)
      else:
        print(msg, file=self.file, flush=True)

  def close(self) -> None:
    for handler, stream in self._redirected:
      handler.stream = stream
    self._redirected = []
    self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


from rft.tb_events import iter_events, read_scalars  # noqa: E402,F401  (re-exported)
