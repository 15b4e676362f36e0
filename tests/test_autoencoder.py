"""FLUX VAE: parity with diffusers' AutoencoderKL through our loader, full-size shapes, loader errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import max_rel_err, perturb_

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.models import autoencoder as ae


def diffusers_config(cfg: ae.AutoencoderConfig) -> dict:
  n = len(cfg.block_out_channels)
  return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
              block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
              norm_num_groups=cfg.norm_num_groups, down_block_types=["DownEncoderBlock2D"] * n,
              up_block_types=["UpDecoderBlock2D"] * n, use_quant_conv=False, use_post_quant_conv=False,
              shift_factor=cfg.shift_factor, scaling_factor=cfg.scaling_factor)


def save_reference(folder: str):
  """A tiny random diffusers AutoencoderKL (every tensor perturbed), saved to `folder`."""
  from diffusers import AutoencoderKL
  torch.manual_seed(0)
  model = AutoencoderKL(**diffusers_config(ae.tiny())).eval()
  perturb_(model)
  model.save_pretrained(folder)
  return model


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("flux") / "vae")
  return save_reference(folder), folder


@pytest.fixture(scope="module")
def ours(reference):
  return ae.load_autoencoder(reference[1])


# Non-square, batch 2; the tiny VAE downsamples by 4, so 28x44 -> a 7x11 latent.
IMAGES = np.random.default_rng(0).uniform(-1, 1, (2, 28, 44, 3)).astype(np.float32)
LATENTS = np.random.default_rng(1).standard_normal((2, 7, 11, 4)).astype(np.float32)


def test_encode_parity(reference, ours):
  with torch.no_grad():
    ref = nhwc(reference[0].encode(nchw(IMAGES)).latent_dist.mode())
  out = np.asarray(ours.encode(IMAGES))
  assert out.shape == ref.shape == (2, 7, 11, 4)
  assert max_rel_err(out, ref) <= 1e-5


def test_decode_parity(reference, ours):
  with torch.no_grad():
    ref = nhwc(reference[0].decode(nchw(LATENTS)).sample)
  out = np.asarray(ours.decode(LATENTS))
  assert out.shape == ref.shape == (2, 28, 44, 3)
  assert max_rel_err(out, ref) <= 1e-5


def test_odd_sizes_pad_like_diffusers(reference, ours):
  """Downsample2D pads bottom/right by one: sizes that do not divide evenly still match."""
  images = IMAGES[:1, :27, :41]
  with torch.no_grad():
    ref = nhwc(reference[0].encode(nchw(images)).latent_dist.mode())
  assert ref.shape == (1, 6, 10, 4)  # floor((n + 1 - 3) / 2) + 1 per downsample
  assert max_rel_err(ours.encode(images), ref) <= 1e-5


def test_jit_equals_eager(ours):
  encode = nnx.jit(lambda m, x: m.encode(x))
  np.testing.assert_allclose(np.asarray(encode(ours, IMAGES)), np.asarray(ours.encode(IMAGES)), rtol=0, atol=1e-5)


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
  assert max_rel_err(np.asarray(out.astype(jnp.float32)), np.asarray(ours.decode(LATENTS))) <= 3e-2


def test_sharded_equals_single_device(reference, ours):
  assert len(jax.devices()) >= 8, "conftest sets 8 host devices"
  mesh = shd.make_mesh((2, 2, 2))
  model = ae.load_autoencoder(reference[1], mesh=mesh)
  kernel = model.encoder.down_blocks[1].resnets[0].conv1.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "tensor")
  images = np.concatenate([IMAGES, IMAGES[:, ::-1]])  # batch 4 over data x fsdp
  with shd.use_mesh(mesh):
    out = nnx.jit(lambda m, x: m.encode(x))(model, images)
  # sharded reductions sum in another order: equal up to float32 rounding
  assert max_rel_err(out, ours.encode(images)) <= 1e-6


# --------------------------------------------------------------------------------------------------
def test_full_size_without_memory():
  from diffusers import AutoencoderKL
  with torch.device("meta"):
    ref = AutoencoderKL(**diffusers_config(ae.flux()))
  ref_shapes = {n: tuple(p.shape) for n, p in ref.state_dict().items()}
  abstract = nnx.eval_shape(lambda: ae.Autoencoder(ae.flux(), rngs=nnx.Rngs(0)))
  _, state = nnx.split(abstract)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  assert n_params == 83_819_683 == sum(int(np.prod(s)) for s in ref_shapes.values())
  assert {k: v[0] for k, v in wio.reference_shapes(state, ae.AUTOENCODER_WEIGHTS).items()} == ref_shapes


def test_from_diffusers_config_round_trip():
  assert ae.AutoencoderConfig.from_diffusers_config(diffusers_config(ae.flux())) == ae.flux()


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


@pytest.mark.parametrize("kind", ["missing", "extra", "misshaped"])
def test_loader_errors_name_the_tensor(reference, tmp_path, kind):
  name = "decoder.mid_block.attentions.0.to_k.weight"
  extra = "decoder.mid_block.attentions.0.bogus.weight"

  def edit(t):
    if kind == "missing":
      del t[name]
    elif kind == "extra":
      t[extra] = np.zeros((2, 2), np.float32)
    else:
      t[name] = t[name][:, :-1]

  folder = _rewrite(reference[1], str(tmp_path / kind), edit_tensors=edit)
  with pytest.raises(wio.CheckpointError) as e:
    ae.load_autoencoder(folder)
  msg = str(e.value)
  assert folder in msg
  assert {"missing": name, "extra": extra, "misshaped": name}[kind] in msg
  assert {"missing": "missing (1)", "extra": "unexpected (1)", "misshaped": "mis-shaped (1)"}[kind] in msg


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
