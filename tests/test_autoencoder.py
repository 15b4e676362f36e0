"""FLUX VAE: padding, latent norm, jit, dtypes, sharding, config errors (loader errors, full size and parity with
diffusers' AutoencoderKL: test_models_contract.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from flux_fixtures import save_vae_reference as save_reference  # noqa: F401 (test_latents, test_pipeline import it)
from flux_fixtures import vae_diffusers_config as diffusers_config  # noqa: F401 (test_weights imports it)
from helpers import bfloat16_bound, float32_bound, max_rel_err

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.models import autoencoder as ae


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


# The tiny reference and its load are session fixtures (flux_fixtures), shared with test_models_contract.py.
@pytest.fixture(scope="module")
def reference(vae_reference):
  return vae_reference


@pytest.fixture(scope="module")
def ours(vae_ours):
  return vae_ours


# Non-square, batch 2; the tiny VAE downsamples by 4, so 28x44 -> a 7x11 latent.
IMAGES = np.random.default_rng(0).uniform(-1, 1, (2, 28, 44, 3)).astype(np.float32)
LATENTS = np.random.default_rng(1).standard_normal((2, 7, 11, 4)).astype(np.float32)
# float32 rounding (helpers.float32_bound): the longest reduction is a full-size GroupNorm (28 x 44 pixels x 8 / 4
# channels); 61 in sequence through the encoder, 79 through the decoder (GroupNorm 2, conv 1, mid attention 5).
ENCODE_BOUND = float32_bound(28 * 44 * 8 // 4, depth=61)  # 9.2e-5
DECODE_BOUND = float32_bound(28 * 44 * 8 // 4, depth=79)  # 1.0e-4


def test_odd_sizes_pad_like_diffusers(reference, ours):
  """Downsample2D pads bottom/right by one: sizes that do not divide evenly still match."""
  images = IMAGES[:1, :27, :41]
  with torch.no_grad():
    ref = nhwc(reference[0].encode(nchw(images)).latent_dist.mode())
  assert ref.shape == (1, 6, 10, 4)  # floor((n + 1 - 3) / 2) + 1 per downsample
  assert max_rel_err(ours.encode(images), ref) <= ENCODE_BOUND  # 27 x 41: shorter norms


def test_jit_equals_eager(ours):
  encode = nnx.jit(lambda m, x: m.encode(x))
  eager = np.asarray(ours.encode(IMAGES))  # fused by jit or not: float32 rounding only
  np.testing.assert_allclose(np.asarray(encode(ours, IMAGES)), eager, rtol=0, atol=ENCODE_BOUND * np.abs(eager).max())


def test_latent_norm_read_from_config(reference, ours):
  norm = ours.latent_norm
  assert (norm.shift, norm.scale) == (reference[0].config.shift_factor, reference[0].config.scaling_factor)
  assert (norm.shift, norm.scale) == (0.1159, 0.3611)
  z = jnp.asarray(LATENTS)
  np.testing.assert_allclose(np.asarray(norm.denormalize(norm.normalize(z))), LATENTS, rtol=0, atol=1e-6)


def test_pipeline_folder_layout(reference):
  model = ae.load_autoencoder(os.path.dirname(reference[1]))
  assert model.cfg.block_out_channels == ae.tiny().block_out_channels


def test_bf16_close_to_float32(reference, ours):
  model = ae.load_autoencoder(reference[1], dtype="bfloat16")
  out = model.decode(LATENTS)
  assert out.dtype == jnp.bfloat16
  # measured 2.0e-2; the decoder is 79 layers deep (see bfloat16_bound)
  assert max_rel_err(np.asarray(out.astype(jnp.float32)), np.asarray(ours.decode(LATENTS))) <= bfloat16_bound(79)


def test_sharded_equals_single_device(reference, ours):
  assert len(jax.devices()) >= 8, "conftest sets 8 host devices"
  mesh = shd.make_mesh((2, 2, 2))
  model = ae.load_autoencoder(reference[1], mesh=mesh)
  kernel = model.encoder.down_blocks[1].resnets[0].conv1.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "tensor")
  images = np.concatenate([IMAGES, IMAGES[:, ::-1]])  # batch 4 over data x fsdp
  with shd.use_mesh(mesh):
    out = nnx.jit(lambda m, x: m.encode(x))(model, images)
  # sharded reductions sum in another order: equal up to float32 rounding (measured 1.0e-6)
  assert max_rel_err(out, ours.encode(images)) <= ENCODE_BOUND


# --------------------------------------------------------------------------------------------------
def _rewrite(folder, dst, edit_tensors=lambda t: None, edit_config=lambda c: None):
  reader = wio.SafetensorsReader.from_folder(folder)
  tensors = {n: np.array(reader.read(n)) for n in reader.names()}
  edit_tensors(tensors)
  os.makedirs(dst)
  wio.save_safetensors(tensors, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
  config = wio.read_config(folder)
  edit_config(config)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  return dst


@pytest.mark.parametrize("field,value", [("use_quant_conv", True), ("act_fn", "gelu"), ("shift_factor", None)])
def test_unsupported_config_is_an_error(reference, tmp_path, field, value):
  folder = _rewrite(reference[1], str(tmp_path / field), edit_config=lambda c: c.update({field: value}))
  with pytest.raises(wio.CheckpointError) as e:
    ae.load_autoencoder(folder)
  assert os.path.join(folder, "config.json") in str(e.value)
  assert field in str(e.value)


def test_quant_conv_default_is_rejected(reference, tmp_path):
  """diffusers defaults `use_quant_conv` to True: a config that omits it is not the FLUX VAE."""
  folder = _rewrite(reference[1], str(tmp_path / "absent"), edit_config=lambda c: c.pop("use_quant_conv"))
  with pytest.raises(wio.CheckpointError, match="use_quant_conv"):
    ae.load_autoencoder(folder)
