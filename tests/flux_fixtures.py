"""Tiny FLUX fixtures shared by the tests: perturbed diffusers models saved to disk (the transformer, a peft adapter,
the VAE)."""

import os

import numpy as np
import pytest
import torch
from helpers import float32_bound, perturb_

from editr1_jax import latents
from editr1_jax.layers import LoraSpec
from editr1_jax.models import autoencoder as ae
from editr1_jax.models import flux

TINY = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
LORA = LoraSpec(rank=4, alpha=8.0, targets=flux.DEFAULT_LORA_TARGETS)


def make_inputs(t, g, batch=2, txt=7, seed=0):
  """Kontext layout: 3x4 target grid then a 2x5 reference grid (non-square, different sizes)."""
  rng = np.random.default_rng(seed)
  img_ids = np.concatenate([latents.grid_ids(0, 3, 4), latents.grid_ids(1, 2, 5)])
  return dict(
      hidden_states=rng.standard_normal((batch, len(img_ids), TINY["in_channels"])).astype(np.float32),
      encoder_hidden_states=rng.standard_normal((batch, txt, TINY["joint_attention_dim"])).astype(np.float32),
      pooled_projections=rng.standard_normal((batch, TINY["pooled_projection_dim"])).astype(np.float32),
      timestep=np.resize(np.asarray(t, np.float32), batch), guidance=np.resize(np.asarray(g, np.float32), batch),
      img_ids=img_ids, txt_ids=np.zeros((txt, 3), np.float32))


# Small sinusoid arguments: t * 1000 * freq stays below ~2 rad, where float32 sin/cos are exact to
# 1 ulp in both frameworks, so what is left is float32 rounding: FLUX_BOUND.
EXACT = dict(t=[7e-4, 1.3e-3], g=[2.1e-3, 9e-4])
# Real values: t * 1000 and guidance * 1000 reach 2,500 rad; a float32 argument that large has an
# ulp of 2.4e-4, and torch and XLA round the frequency table and the product differently (measured
# 6e-5 on the embedding itself), so two correct float32 implementations differ at ~4e-5 here.
REAL = dict(t=[0.3, 0.9], g=[2.5, 3.5])
# float32 rounding of the TINY forward (helpers.float32_bound): longest reduction the time MLP's K = 256; ~47 in
# sequence (embedders 4, 2 double blocks x 12, 2 single x 8, norm_out 3; a LayerNorm counts 2): 2.6e-5.
FLUX_BOUND = float32_bound(256, depth=47)


def torch_forward(model, inputs):
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).sample
  return out.numpy()


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  from diffusers import FluxTransformer2DModel
  torch.manual_seed(0)
  model = FluxTransformer2DModel(**TINY).eval()
  perturb_(model)
  folder = str(tmp_path_factory.mktemp("flux") / "transformer")
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope="session")
def ours(reference):
  return flux.load_flux_transformer(reference[1])


@pytest.fixture(scope="session")
def lora_reference(reference, tmp_path_factory):
  """The same base with a peft adapter (B perturbed so it is not a no-op), saved as diffusers does."""
  from diffusers import FluxKontextPipeline, FluxTransformer2DModel
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  model = FluxTransformer2DModel.from_pretrained(reference[1]).eval()
  model.add_adapter(LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, init_lora_weights="gaussian",
                               target_modules=list(LORA.targets)))
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=g))
  folder = str(tmp_path_factory.mktemp("lora"))
  FluxKontextPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model))
  return model, os.path.join(folder, "pytorch_lora_weights.safetensors")


# --------------------------------------------------------------------------------------------------
# The VAE (test_autoencoder.py, test_models_contract.py).
def vae_diffusers_config(cfg: ae.AutoencoderConfig) -> dict:
  n = len(cfg.block_out_channels)
  return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
              block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
              norm_num_groups=cfg.norm_num_groups, down_block_types=["DownEncoderBlock2D"] * n,
              up_block_types=["UpDecoderBlock2D"] * n, use_quant_conv=False, use_post_quant_conv=False,
              shift_factor=cfg.shift_factor, scaling_factor=cfg.scaling_factor)


def save_vae_reference(folder: str):
  """A tiny random diffusers AutoencoderKL (every tensor perturbed), saved to `folder`."""
  from diffusers import AutoencoderKL
  torch.manual_seed(0)
  model = AutoencoderKL(**vae_diffusers_config(ae.tiny())).eval()
  perturb_(model)
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="session")
def vae_reference(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("flux") / "vae")
  return save_vae_reference(folder), folder


@pytest.fixture(scope="session")
def vae_ours(vae_reference):
  return ae.load_autoencoder(vae_reference[1])
