"""FLUX transformer: our jitted forward (and LoRA forward+backward) vs diffusers eager, same weights and inputs.

  python benchmarks/flux_forward.py [--sizes tiny,real] [--repeats 3]

"real" is FLUX's width (3072 = 24 heads x 128) with 1 double + 1 single block (480M parameters; two
blocks of each need over 20 GB for both frameworks together, more than a 24 GB machine gives) at
512x512: 1024 target + 1024 reference tokens and 128 text tokens. The last line is the
realistic-width forward ratio. On CPU it is bounded by the GEMM: one (2176 x 3072) @ (3072 x 12288)
float32 matmul measured 673 ms in XLA:CPU vs 526 ms in torch's oneDNN on the same 2 cores (1.28x).
"""

import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import arguments, median_ms, print_table, same_footing  # noqa: E402
from editr1_jax.layers import LoraSpec  # noqa: E402
from editr1_jax.models import flux  # noqa: E402

SIZES = {
    "tiny": dict(config=dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                             axes_dims_rope=[4, 6, 6]), grid=(8, 8), text=16),
    "real": dict(config=dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                             axes_dims_rope=[16, 56, 56]), grid=(32, 32), text=128),
}
LORA = LoraSpec(rank=32, alpha=64.0, targets=flux.DEFAULT_LORA_TARGETS)


def make_inputs(config, grid, text, seed=0):
  rng = np.random.default_rng(seed)
  r, c = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  ids = [np.stack([np.full(r.size, k), r.ravel(), c.ravel()], -1) for k in (0, 1)]
  img_ids = np.concatenate(ids).astype(np.float32)
  return dict(
      hidden_states=rng.standard_normal((1, len(img_ids), config["in_channels"]), np.float32),
      encoder_hidden_states=rng.standard_normal((1, text, config["joint_attention_dim"]), np.float32),
      pooled_projections=rng.standard_normal((1, config["pooled_projection_dim"]), np.float32),
      timestep=np.array([0.5], np.float32), guidance=np.array([2.5], np.float32),
      img_ids=img_ids, txt_ids=np.zeros((text, 3), np.float32))


def bench(size, repeats):
  from diffusers import FluxTransformer2DModel
  from peft import LoraConfig
  spec = SIZES[size]
  torch.manual_seed(0)
  ref = FluxTransformer2DModel(guidance_embeds=True, **spec["config"]).eval()
  inputs = make_inputs(spec["config"], spec["grid"], spec["text"])
  tin = {k: torch.from_numpy(v) for k, v in inputs.items()}
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    model = flux.load_flux_transformer(d, lora=LORA)
  graphdef, adapters, base = flux.split_params(model)

  @jax.jit
  def forward(adapters, base, x):
    return nnx.merge(graphdef, adapters, base)(**x)

  @jax.jit
  def forward_backward(adapters, base, x):
    return jax.grad(lambda a: jnp.mean(jnp.square(nnx.merge(graphdef, a, base)(**x))))(adapters)

  rows = []
  with torch.no_grad():
    t_ref = median_ms(lambda: ref(**tin).sample, repeats=repeats)
  t_ours = median_ms(lambda: forward(adapters, base, inputs), repeats=repeats, block=jax.block_until_ready)
  rows.append((size, "forward", t_ours, t_ref, t_ours / t_ref))

  ref.add_adapter(LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, init_lora_weights="gaussian",
                             target_modules=list(LORA.targets)))
  ref.train()  # peft adapters need grad; dropout is 0 everywhere in FLUX

  def ref_fb():
    ref.zero_grad(set_to_none=True)
    out = ref(**tin).sample
    out.square().mean().backward()

  t_ref = median_ms(ref_fb, repeats=repeats)
  t_ours = median_ms(lambda: forward_backward(adapters, base, inputs), repeats=repeats, block=jax.block_until_ready)
  rows.append((size, "LoRA forward+backward", t_ours, t_ref, t_ours / t_ref))
  return rows


def main():
  parser = arguments("tiny,real", repeats=3)
  args = parser.parse_args()
  same_footing()
  rows = [r for size in args.sizes.split(",") for r in bench(size, args.repeats)]
  print(f"device: {jax.devices()[0].device_kind}, float32, torch {torch.__version__} eager, jax {jax.__version__} jit")
  print_table(("size", "work", "ours ms", "diffusers ms", "ours/reference"), rows)
  print(f"bf16 forward+backward MFU: not measured (backend {jax.default_backend()}, no GPU in this run)")
  final = [r for r in rows if r[1] == "forward"][-1]
  print(f"flux_forward ours/reference time ratio: {final[4]:.3f}")


if __name__ == "__main__":
  main()
