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


def test_a_hub_id_downloads_only_configs_safetensors_and_tokenizer_files(tmp_path,
                                                                         monkeypatch):
  """Not in the cache: snapshot_download with HUB_PATTERNS (nothing pickled), and the
  snapshot it returns; offline or failing: an error naming the id and the command."""
  import huggingface_hub
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  calls = []

  def fake_download(repo_id, allow_patterns=None, **kw):
    calls.append((repo_id, tuple(allow_patterns)))
    snap = tmp_path / "downloaded" / repo_id.replace("/", "--")
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    return str(snap)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  got = io.resolve_model_dir("some-org/some-model")
  assert got == str(tmp_path / "downloaded" / "some-org--some-model")
  assert calls == [("some-org/some-model", ("*.json", "*.safetensors", "*.txt", "*.model"))]
  # download=False and HF_HUB_OFFLINE: no call, an error naming the id and the fetch command
  for kw, env in (({"download": False}, None), ({}, "1")):
    if env:
      monkeypatch.setenv("HF_HUB_OFFLINE", env)
    with pytest.raises(FileNotFoundError) as e:
      io.resolve_model_dir("other-org/absent", **kw)
    msg = str(e.value)
    assert "'other-org/absent'" in msg and "hf download other-org/absent" in msg
    assert "models--other-org--absent" in msg
  assert len(calls) == 1
  monkeypatch.delenv("HF_HUB_OFFLINE")

  def failing(repo_id, **kw):
    raise OSError("Name or service not known\nmore lines")
  monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
  with pytest.raises(FileNotFoundError, match=r"downloading it failed \(OSError: Name or "
                                              r"service not known\)"):
    io.resolve_model_dir("other-org/absent")
  # A local path that does not exist is not a hub id: no download is tried.
  with pytest.raises(FileNotFoundError, match="No model found for './nowhere'"):
    io.resolve_model_dir("./nowhere")


def test_reward_weights_file_from_a_hub_repo(tmp_path, monkeypatch):
  """weights_file=hf://org/name/file: hf_hub_download's path (cache only when offline);
  a failure names the config key and the `hf download` command; local paths as before."""
  import huggingface_hub

  from rft.rewards import clip_rewards
  calls = []

  def fake(repo, filename, local_files_only=False):
    calls.append((repo, filename, local_files_only))
    if local_files_only:
      raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
    (tmp_path / filename).write_bytes(b"w")
    return str(tmp_path / filename)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  kw = dict(reward="hpsv2", key="weights_file", how="HOW")
  got = clip_rewards.weights_file_for("hf://xswu/HPSv2/HPS_v2_compressed.pt", **kw)
  assert got == str(tmp_path / "HPS_v2_compressed.pt")
  assert calls == [("xswu/HPSv2", "HPS_v2_compressed.pt", False)]
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError) as e:
    clip_rewards.weights_file_for("hf://xswu/HPSv2/sub/x.pt", **kw)
  msg = str(e.value)
  assert calls[-1] == ("xswu/HPSv2", "sub/x.pt", True)
  assert "config.reward_options.hpsv2.weights_file" in msg and "HF_HUB_OFFLINE" in msg
  assert "`hf download xswu/HPSv2 sub/x.pt`" in msg and msg.endswith("HOW")
  with pytest.raises(ValueError, match="hf://<org>/<name>/<file in the repo>"):
    clip_rewards.weights_file_for("hf://xswu/HPSv2", **kw)
  (tmp_path / "local.pt").write_bytes(b"w")
  assert clip_rewards.weights_file_for(str(tmp_path / "local.pt"), **kw) == str(tmp_path / "local.pt")
  with pytest.raises(FileNotFoundError, match="no such file. HOW"):
    clip_rewards.weights_file_for(str(tmp_path / "absent.pt"), **kw)
