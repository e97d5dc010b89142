"""rft.weights.io: reading safetensors files written by torch (bf16 included)."""
import numpy as np
import pytest

from rft.weights import io


def test_bf16_safetensors_from_torch_read_as_float32_with_other_dtypes_kept(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
  save_file({"w": w, "ids": torch.arange(4), "h": torch.ones(2, dtype=torch.float16)},
            str(tmp_path / "a.safetensors"))
  save_file({"b": torch.full((2,), 0.5)}, str(tmp_path / "b.safetensors"))
  state = io.load_safetensors([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
  assert state["w"].dtype == np.float32
  np.testing.assert_array_equal(state["w"], w.float().numpy())  # bf16 -> f32 is exact
  assert state["ids"].dtype == np.int64 and state["ids"].tolist() == [0, 1, 2, 3]
  assert state["h"].dtype == np.float16 and state["b"].tolist() == [0.5, 0.5]
  save_file({"w": torch.zeros(1)}, str(tmp_path / "c.safetensors"))
  with pytest.raises(ValueError, match="key w appears in more than one weight file"):
    io.load_safetensors([str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors")])
  (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="bad.safetensors: cannot read as safetensors"):
    io.load_safetensors([str(tmp_path / "bad.safetensors")])
