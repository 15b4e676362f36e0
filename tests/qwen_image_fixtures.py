"""Tiny Qwen-Image transformer fixtures shared by the tests: a perturbed diffusers `QwenImageTransformer2DModel`
saved to disk, our load of it, and a peft adapter on the same base saved as diffusers' Qwen-Image pipelines do.
Import the fixtures into a test module (`from qwen_image_fixtures import qwen_image_reference, ...`)."""

import os

import numpy as np
import pytest
import torch
from helpers import float32_bound, perturb_

from editr1_jax.layers import LoraSpec
from editr1_jax.models import qwen_image as qi

# qi.tiny() as diffusers' constructor arguments
TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, axes_dims_rope=[4, 6, 6])
LORA = LoraSpec(rank=4, alpha=8.0, targets=qi.DEFAULT_LORA_TARGETS)
# One row's images: a 3x4 target, then references of other sizes (non-square; odd and even extents).
ONE_REFERENCE = [(1, 3, 4), (1, 2, 5)]
TWO_REFERENCES = [(1, 3, 4), (1, 2, 5), (1, 4, 3)]
TEXT_LENGTHS = (7, 4)  # real text tokens per row; row 2 is padded at the end to 7
# Small sinusoid arguments (t * 1000 * freq below ~2 rad) and the pipeline's real range.
EXACT = [7e-4, 1.3e-3]
REAL = [0.3, 0.9]
# float32 rounding of the tiny forward (helpers.float32_bound): the longest reduction is the time MLP's K = 256;
# 32 in sequence: time MLP 2 + txt_norm 1 + txt_in 1; per block 12 (modulation 1, LayerNorm 2, q/k/v 1, QK RMSNorm 1,
# attention logits 1 and weighted sum 1, to_out 1, LayerNorm 2, fc1 1, fc2 1) x 2 blocks; norm_out linear 1 +
# LayerNorm 2 + proj_out 1: 2.2e-5. With EXACT timesteps nothing else differs (the sinusoids even scale t after
# the frequencies in diffusers' order: flux.timestep_embedding's `scale`).
QWEN_IMAGE_BOUND = float32_bound(256, depth=32)
# REAL timesteps add one more difference: numpy's float32 exp and torch's round about half of the 128 sinusoid
# frequencies one ulp (2^-23 relative) apart, which at arguments up to 1000 * max(REAL) rad moves a sinusoid (of
# magnitude <= 1) by up to 1000 * 0.9 * 2^-23 = 1.1e-4; the time MLP and the modulation pass it on about 1:1.
QWEN_IMAGE_REAL_BOUND = QWEN_IMAGE_BOUND + 1000 * max(REAL) * 2.0 ** -23  # 1.3e-4


def make_inputs(shapes, t, batch: int = 2, seed: int = 0) -> dict:
  """diffusers' forward arguments: `shapes` (one row's images) for every row, row r with TEXT_LENGTHS[r] real
  text tokens (mask zeros after them)."""
  rng = np.random.default_rng(seed)
  n_img = sum(f * h * w for f, h, w in shapes)
  n_txt = max(TEXT_LENGTHS)
  mask = np.zeros((batch, n_txt), np.int64)
  for row in range(batch):
    mask[row, :TEXT_LENGTHS[row % len(TEXT_LENGTHS)]] = 1
  return dict(
      hidden_states=rng.standard_normal((batch, n_img, TINY["in_channels"])).astype(np.float32),
      encoder_hidden_states=rng.standard_normal((batch, n_txt, TINY["joint_attention_dim"])).astype(np.float32),
      encoder_hidden_states_mask=mask, timestep=np.resize(np.asarray(t, np.float32), batch),
      img_shapes=[list(shapes)] * batch)


def torch_forward(model, inputs: dict) -> np.ndarray:
  args = {k: v if k == "img_shapes" else torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
  with torch.no_grad():
    return model(**args).sample.numpy()


@pytest.fixture(scope="session")
def qwen_image_reference(tmp_path_factory):
  """(diffusers model, folder): the folder is a pipeline's `transformer/`, its parent the pipeline root."""
  from diffusers import QwenImageTransformer2DModel
  torch.manual_seed(0)
  model = QwenImageTransformer2DModel(**TINY).eval()
  perturb_(model)
  folder = str(tmp_path_factory.mktemp("qwen_image") / "transformer")
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope="session")
def qwen_image_ours(qwen_image_reference):
  return qi.load_qwen_image_transformer(qwen_image_reference[1])


def write_lora_reference(base_folder: str, out_folder: str):
  """(peft model, LoRA file): the base in `base_folder` with a rank-4 adapter on the eight targets (B perturbed so
  it is not a no-op), saved by QwenImageEditPlusPipeline.save_lora_weights under `out_folder`."""
  from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  model = QwenImageTransformer2DModel.from_pretrained(base_folder).eval()
  model.add_adapter(LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, init_lora_weights="gaussian",
                               target_modules=list(LORA.targets)))
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=g))
  QwenImageEditPlusPipeline.save_lora_weights(out_folder, transformer_lora_layers=get_peft_model_state_dict(model))
  return model, os.path.join(out_folder, "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="session")
def qwen_image_lora_reference(qwen_image_reference, tmp_path_factory):
  """`write_lora_reference` on the tiny base."""
  return write_lora_reference(qwen_image_reference[1], str(tmp_path_factory.mktemp("qwen_image_lora")))
