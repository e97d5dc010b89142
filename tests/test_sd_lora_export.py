"""LoRA runs on Stable Diffusion export the adapter in diffusers' PEFT format: diffusers
(with peft) loads it onto the base UNet and computes what rft's merged UNet computes."""
from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rft.models import lora  # noqa: E402
from rft.weights.sd_unet import load_unet, lora_to_diffusers, save_unet, save_unet_lora  # noqa: E402
from tests.sd_fixtures import tiny_sd_folder  # noqa: E402

# the attention projections (linear) and the res-blocks' first 3x3 conv (PEFT's Conv2d LoRA)
TARGETS = (r"^unet/.*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$",
           r"^unet/.*/resnets_\d+/conv1/kernel$")


def test_peft_adapter_on_the_base_unet_equals_the_merged_unet(tmp_path):
  folder = tiny_sd_folder(str(tmp_path / "sd"), variant="sd1")
  config, _, params = load_unet(folder)
  alpha, rank = 8.0, 4  # scale 2: folded into lora_B
  tree = lora.init({"unet": params}, jax.random.key(0), rank, TARGETS)
  rng = np.random.default_rng(0)
  tree = {p: {"a": ab["a"], "b": rng.normal(0, 0.05, ab["b"].shape).astype(np.float32)}
          for p, ab in tree.items()}
  assert any(ab["a"].ndim == 2 and "conv1" in p for p, ab in tree.items())
  merged = lora.merge({"unet": params}, tree, alpha, rank)["unet"]
  save_unet(str(tmp_path / "merged"), config, merged)
  path = save_unet_lora(str(tmp_path / "lora"), config, tree, alpha=alpha, rank=rank)
  assert path.endswith("lora/pytorch_lora_weights.safetensors")
  state = lora_to_diffusers(tree, config, alpha=alpha, rank=rank)
  assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
             for k in state) and len(state) == 2 * len(tree)

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                          requires_safety_checker=False)
  unet = pipe.unet
  ref = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "merged"))
  g = torch.Generator().manual_seed(0)
  x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
  ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
  t = torch.tensor([10, 700])
  with torch.no_grad():
    before = unet(x, t, ctx).sample
    pipe.load_lora_weights(str(tmp_path / "lora"))  # what a diffusers user runs
    got = unet(x, t, ctx).sample
    want = ref(x, t, ctx).sample
  assert float((want - before).abs().max()) > 1e-3  # the adapter changes the output
  np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5, rtol=0)
  # every targeted layer received its adapter
  n_lora = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
  assert n_lora == len(tree)


def test_a_lora_path_outside_the_unet_or_not_a_kernel_is_an_error(tmp_path):
  folder = tiny_sd_folder(str(tmp_path / "sd"), variant="sd1")
  config, _, params = load_unet(folder)
  tree = lora.init({"unet": params}, jax.random.key(0), 2, TARGETS)
  p, ab = next(iter(tree.items()))
  with pytest.raises(ValueError, match="is not a UNet param"):
    lora_to_diffusers({"text/" + p: ab}, config, alpha=2, rank=2)
  with pytest.raises(ValueError, match="is not a kernel of this UNet"):
    lora_to_diffusers({p.replace("kernel", "nope"): ab}, config, alpha=2, rank=2)
