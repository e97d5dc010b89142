"""Tests for rft.metrics: TF-free writers, event reading, grids, progress."""

import importlib.util
import os
import struct
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rft import image_grids, metrics, tb_events

_TF_INSTALLED = importlib.util.find_spec("tensorflow") is not None


def test_tensorboard_writer_roundtrip(tmp_path):
  logdir = str(tmp_path / "tb")
  w = metrics.TensorBoardWriter(logdir)
  w.write_scalars(0, {"loss": 1.5, "acc": np.float32(0.25)})
  w.write_scalars(10, {"loss": jnp.asarray(0.75, jnp.float32),
                       "acc": np.float64(0.5)})
  w.write_scalars(20, {"loss": jnp.float32(0.125), "count": 7})
  grid = np.random.RandomState(0).rand(8, 8, 3)
  w.write_images(10, {"grid": grid, "batch": np.zeros((2, 4, 4, 3), np.uint8)})
  w.write_texts(10, {"prompt": "a red circle"})
  w.write_histograms(10, {"w": jnp.linspace(-1, 1, 100)})
  w.write_hparams({"lr": 1e-3, "name": "run", "layers": [1, 2]}, metrics=["loss"])
  # A tensor-encoded scalar (as TF2's tf.summary.scalar writes it), through
  # tensorboardX's file writer: read_scalars reads both encodings.
  from tensorboardX.proto import summary_pb2, tensor_pb2, tensor_shape_pb2
  meta = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
  for step, value, first in ((30, 2.5, True), (40, -3.25, False)):
    tensor = tensor_pb2.TensorProto(dtype="DT_FLOAT", float_val=[value],
                                    tensor_shape=tensor_shape_pb2.TensorShapeProto())
    w._writer._get_file_writer().add_summary(summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag="tensor_scalar", tensor=tensor,
                                  **({"metadata": meta} if first else {}))]), step)
  w.flush()
  w.close()

  files = [f for f in os.listdir(logdir) if "tfevents" in f]
  assert len(files) == 1
  got = metrics.read_scalars(logdir)
  assert got["loss"] == [(0, 1.5), (10, 0.75), (20, 0.125)]
  assert got["acc"] == [(0, 0.25), (10, 0.5)]
  assert got["count"] == [(20, 7.0)]
  assert got["tensor_scalar"] == [(30, 2.5), (40, -3.25)]
  # Images, texts, histograms, hparams are not scalars.
  assert set(got) == {"loss", "acc", "count", "tensor_scalar"}

  # The other summaries are in the file with the expected kinds and contents.
  kinds = {}
  for ev in metrics.iter_events(logdir):
    for v in ev.summary.value:
      kinds[v.tag] = v.WhichOneof("value")
  assert kinds["w"] == "histo"
  assert "_hparams_/session_start_info" in kinds and "_hparams_/experiment" in kinds
  images = tb_events.read_images(logdir)
  assert set(images) == {"grid", "batch/0", "batch/1"}
  np.testing.assert_array_equal(images["grid"][0][1],
                                np.round(grid * 255).astype(np.uint8))
  assert images["grid"][0][0] == 10
  texts = tb_events.read_texts(logdir)
  assert texts["prompt"] == [(10, "a red circle")]
  assert "| layers | [1, 2] |" in texts["hparams"][0][1]
  assert tb_events.read_hparams(logdir) == {
      "hparams": {"lr": 1e-3, "name": "run", "layers": "[1, 2]"}, "metrics": ["loss"]}

  if not _TF_INSTALLED:
    assert "tensorflow" not in sys.modules


def test_flatten_hparams_dots_nested_blocks_and_stringifies_the_rest():
  from ml_collections import config_dict
  c = config_dict.ConfigDict({"lr": 3e-4, "epochs": 40, "kl_metric": True, "name": "prdp",
                              "objective": {"name": "prdp", "beta": 0.1,
                                            "inner": {"x": None}},
                              "channels": (16, 32), "reward_options": {}})
  assert metrics.flatten_hparams(c) == {
      "lr": 3e-4, "epochs": 40, "kl_metric": True, "name": "prdp",
      "objective.name": "prdp", "objective.beta": 0.1, "objective.inner.x": "None",
      "channels": "(16, 32)", "reward_options": "{}"}


def test_read_scalars_detects_corruption(tmp_path):
  logdir = str(tmp_path / "tb")
  w = metrics.TensorBoardWriter(logdir)
  w.write_scalars(1, {"x": 1.0})
  w.close()
  (path,) = [os.path.join(logdir, f) for f in os.listdir(logdir)]
  data = bytearray(open(path, "rb").read())
  # Flip a byte in the payload of the last record (header is 12 bytes).
  (length,) = struct.unpack("<Q", data[:8])
  offset = 0
  while offset + 12 + length + 4 < len(data):
    offset += 12 + length + 4
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
  data[offset + 12 + length // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(ValueError, match="corrupt"):
    metrics.read_scalars(logdir)
  # A truncated tail (a record being written) is silently ignored.
  open(path, "wb").write(bytes(data[:offset + 5]))
  assert metrics.read_scalars(logdir) == {}


def test_create_writer(tmp_path):
  w = metrics.create_writer(str(tmp_path / "main"), is_main=True)
  assert isinstance(w, metrics.TensorBoardWriter)
  w.write_scalars(3, {"loss": 0.5})
  w.close()
  assert metrics.read_scalars(str(tmp_path / "main")) == {"loss": [(3, 0.5)]}

  other = metrics.create_writer(str(tmp_path / "other"), is_main=False)
  other.write_scalars(3, {"loss": 0.5})
  other.write_images(3, {"x": np.zeros((4, 4, 3))})
  other.close()
  assert not os.path.exists(tmp_path / "other")


def test_image_grid_layout_and_pixels():
  rng = np.random.RandomState(0)
  n, h, w, scale, ncols, gap = 5, 6, 7, 2, 4, 2
  images = rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32)
  captions = ["a red circle left of a blue square", "b", "", "two green stars",
              "x" * 50]
  grid = image_grids.image_grid(images, captions, ncols=ncols, scale=scale)
  assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
  tw, th = w * scale, h * scale
  assert grid.shape[1] == gap + ncols * (tw + gap)
  cap_h = (grid.shape[0] - gap) // 2 - th - gap  # 2 rows
  assert cap_h > 0
  assert grid.shape[0] == gap + 2 * (th + cap_h + gap)

  expected_u8 = np.round((images + 1) * 127.5).astype(np.uint8)
  for i in (0, 4):  # first tile and the tile on the second row
    r, c = divmod(i, ncols)
    y, x = gap + r * (th + cap_h + gap), gap + c * (tw + gap)
    tile = grid[y:y + th, x:x + tw]
    np.testing.assert_array_equal(
        tile, expected_u8[i].repeat(scale, 0).repeat(scale, 1))
  # Captions put dark pixels under the first tile, none under the empty one.
  y0 = gap + th
  assert grid[y0:y0 + cap_h, gap:gap + tw].min() < 128
  x2 = gap + 2 * (tw + gap)
  assert grid[y0:y0 + cap_h, x2:x2 + tw].min() == 255

  # uint8 input passes through; no captions -> no caption band.
  u8 = (rng.rand(3, 4, 4, 3) * 255).astype(np.uint8)
  g2 = image_grids.image_grid(u8, ncols=8, scale=1)
  assert g2.shape == (gap + 4 + gap, gap + 3 * (4 + gap), 3)
  np.testing.assert_array_equal(g2[gap:gap + 4, gap:gap + 4], u8[0])


def test_save_image(tmp_path):
  from PIL import Image
  grid = image_grids.image_grid(np.zeros((2, 4, 4, 3), np.uint8), ["a", "b"])
  path = str(tmp_path / "sub" / "grid.png")
  image_grids.save_image(path, grid)
  np.testing.assert_array_equal(np.array(Image.open(path)), grid)


def test_progress_bar_resume():
  bar = metrics.ProgressBar(100, initial=40, desc="train", disable=False,
                            file=open(os.devnull, "w"))
  assert bar.n == 40
  assert bar.bar.initial == 40
  bar.update(45, loss=jnp.float32(0.5), reward=1.25)
  assert bar.n == 45
  assert "loss" in bar.bar.postfix and "0.5" in bar.bar.postfix
  d = bar.bar.format_dict
  assert d["n"] == 45 and d["total"] == 100 and d["initial"] == 40
  # Rate/ETA from this run's 5 steps only: 5 steps in 5 s -> 1 step/s, 55 s.
  line = bar.bar.format_meter(**{**d, "elapsed": 5.0, "rate": None})
  assert "45/100" in line and "00:55" in line and "1.00step/s" in line, line
  bar.close()


def test_progress_bar_disabled_off_main():
  bar = metrics.ProgressBar(10, disable=True)
  bar.update(5, loss=1.0)
  bar.close()
