"""FLUX VAE: our jitted encode / decode vs diffusers AutoencoderKL eager, same weights and inputs, 512x512.

  python benchmarks/vae_codec.py [--sizes tiny,half] [--repeats 3] [--batch 1]

All sizes keep FLUX's structure (4 blocks, downsampling 8, mid-block attention over 64x64 = 4096
positions at 512x512, 16 latent channels). "tiny": widths (16, 32, 32, 32). "half": half FLUX's
widths (64, 128, 256, 256), 1 resnet per block, 32 groups: realistic channel counts at ~1/6 of the
work, because the full VAE (~2.4 TFLOP per 512x512 decode) takes tens of seconds a call on 2 CPU
cores. "full": the FLUX VAE itself (for a machine that can afford it). The last line is the ratio of
the last size's encode + decode times.
"""

import os
import sys
import tempfile

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import arguments, median_ms, print_table, same_footing  # noqa: E402
from editr1_jax.models import autoencoder as ae  # noqa: E402

SIZES = {
    "tiny": ae.AutoencoderConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
    "half": ae.AutoencoderConfig(block_out_channels=(64, 128, 256, 256), layers_per_block=1),
    "full": ae.flux(),
}
RESOLUTION = 512


def diffusers_model(cfg: ae.AutoencoderConfig):
  from diffusers import AutoencoderKL
  n = len(cfg.block_out_channels)
  return AutoencoderKL(latent_channels=cfg.latent_channels, block_out_channels=list(cfg.block_out_channels),
                       layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
                       down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                       use_quant_conv=False, use_post_quant_conv=False, shift_factor=cfg.shift_factor,
                       scaling_factor=cfg.scaling_factor).eval()


def bench(size, repeats, batch):
  cfg = SIZES[size]
  torch.manual_seed(0)
  ref = diffusers_model(cfg)
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    model = ae.load_autoencoder(d)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, RESOLUTION, RESOLUTION, 3)).astype(np.float32)
  side = RESOLUTION // cfg.downsample_factor
  latents = rng.standard_normal((batch, side, side, cfg.latent_channels)).astype(np.float32)
  t_images, t_latents = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))) for x in (images, latents))

  encode = jax.jit(lambda m, x: m.encode(x))  # as the training loop calls it
  decode = jax.jit(lambda m, z: m.decode(z))
  rows = []
  with torch.no_grad():
    t_ref = median_ms(lambda: ref.encode(t_images).latent_dist.mode(), repeats=repeats)
    t_ours = median_ms(lambda: encode(model, images), repeats=repeats, block=jax.block_until_ready)
    rows.append((size, "encode", t_ours, t_ref, t_ours / t_ref))
    t_ref = median_ms(lambda: ref.decode(t_latents).sample, repeats=repeats)
    t_ours = median_ms(lambda: decode(model, latents), repeats=repeats, block=jax.block_until_ready)
    rows.append((size, "decode", t_ours, t_ref, t_ours / t_ref))
  return rows


def main():
  parser = arguments("tiny,half", repeats=3)
  parser.add_argument("--batch", type=int, default=1)
  args = parser.parse_args()
  same_footing()
  sizes = args.sizes.split(",")
  rows = [r for size in sizes for r in bench(size, args.repeats, args.batch)]
  print(f"device: {jax.devices()[0].device_kind}, float32, {RESOLUTION}x{RESOLUTION}, batch {args.batch}, "
        f"torch {torch.__version__} eager, jax {jax.__version__} jit")
  print_table(("size", "work", "ours ms", "diffusers ms", "ours/reference"), rows)
  last = [r for r in rows if r[0] == sizes[-1]]
  ratio = sum(r[2] for r in last) / sum(r[3] for r in last)
  print(f"vae_codec ours/reference time ratio: {ratio:.3f}")


if __name__ == "__main__":
  main()
