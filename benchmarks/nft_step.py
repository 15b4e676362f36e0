"""One epoch of DiffusionNFT training: our jitted step vs a PyTorch step written as the public code does it.

  python benchmarks/nft_step.py [--sizes small,medium] [--group 4] [--micro-batch 2] [--steps 6]

Work: k rollouts of one group x T = int(0.99 N) training timesteps, each term three velocity
predictions (old adapter, current adapter with gradient, no adapter) and a backward pass, gradients
accumulated over the epoch, then one AdamW step and the old-policy update. Same weights (a diffusers
folder loaded by both), same inputs, float32 on CPU, one timed run after one warm-up epoch.
Reference: diffusers FluxTransformer2DModel + peft adapters "default" and "old", eager, three
separate calls per term switched with set_adapter / disable_adapters. Ours: NFTTrainer.accumulate
per micro-batch (v_old and v_ref from one batched call) + apply + update_old.
A filtered-out rollout: the same epoch with 2 extra rollouts of a low-variance group, whose filtering
happens before micro-batches exist; its cost in ours is the time difference per extra rollout. The
public code still runs its three predictions and backward pass, i.e. one rollout's share of its epoch.
"""

import os
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import arguments, print_table, same_footing  # noqa: E402
from editr1_jax import latents, nft, sampling  # noqa: E402
from editr1_jax.advantages import AdvantageConfig, compute_advantages  # noqa: E402
from editr1_jax.families import kontext  # noqa: E402
from editr1_jax.layers import LoraSpec  # noqa: E402
from editr1_jax.models import flux  # noqa: E402

# 1 double + 1 single block; "small": width 384 (6 heads of 64), an 8x8-token target, its 8x8 reference and
# 32 text tokens; "medium": width 512 (8 heads of 64), 16x16 tokens (a 256x256 image), 64 text tokens.
SIZES = {
    "small": dict(heads=6, grid=(8, 8), text=32),
    "medium": dict(heads=8, grid=(16, 16), text=64),
}
LORA = LoraSpec(rank=32, alpha=64.0, targets=flux.DEFAULT_LORA_TARGETS)
NFT = nft.NFTConfig()


def diffusers_config(size: str) -> dict:
  return dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
              num_attention_heads=SIZES[size]["heads"], joint_attention_dim=4096, pooled_projection_dim=768,
              axes_dims_rope=[8, 28, 28], guidance_embeds=True)


def epoch_inputs(size, n, steps, seed=0):
  """n rollouts' clean latents and conditioning, and their sigma list."""
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  grid, text = SIZES[size]["grid"], SIZES[size]["text"]
  tokens = grid[0] * grid[1]
  cond = kontext.KontextCondition(
      reference=jnp.asarray(f32(n, tokens, 64)), text=jnp.asarray(f32(n, text, 4096)),
      pooled=jnp.asarray(f32(n, 768)), guidance=jnp.full((n,), 2.5, jnp.float32),
      img_ids=jnp.asarray(np.concatenate([latents.target_ids(*grid), latents.reference_ids(*grid)])),
      txt_ids=jnp.zeros((text, 3), jnp.float32))
  return jnp.asarray(f32(n, tokens, 64)), cond, sampling.shifted_sigmas(steps, tokens)


# --------------------------------------------------------------------------------------------------
def ours_epoch(trainer, state, frozen, x0, cond, sigmas, ids, rewards, micro_batch, key):
  """Advantages and filtering on the host, then only kept rollouts go through the transformer."""
  epoch = compute_advantages(ids, rewards, cfg=AdvantageConfig())
  for m, (index, adv, mask) in enumerate(zip(*epoch.micro_batches(micro_batch))):
    batch = nft.gather_batch(x0, cond, kontext.KontextCondition.logical_axes(), sigmas, index, adv, mask)
    state, _ = trainer.accumulate(state, frozen, batch, jax.random.fold_in(key, m))
  state, metrics = trainer.apply(state)
  state, _ = trainer.update_old(state)
  jax.block_until_ready(state)
  return state, metrics


def bench_ours(size, folder, k, micro_batch, steps):
  model = flux.load_flux_transformer(folder, lora=LORA)
  policy, params, frozen = nft.Policy.from_model(model, kontext.velocity, kontext.KontextCondition.logical_axes())
  abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  trainer = nft.NFTTrainer(policy, NFT, abstract(params), abstract(frozen))
  state = trainer.init(params)
  x0, cond, sigmas = epoch_inputs(size, k + 2, steps)
  group = (list(np.zeros(k, int)), list(np.linspace(0.2, 0.8, k)))
  filtered = ([1, 1], [0.95, 0.95])  # mean > 0.9, std < 0.05: dropped (paper rule)
  times = {}
  for name, (ids, rewards) in [("kept", group), ("kept+filtered", (group[0] + filtered[0], group[1] + filtered[1]))]:
    for run in ("warmup", "timed"):
      t0 = time.perf_counter()
      state, metrics = ours_epoch(trainer, state, frozen, x0, cond, sigmas, ids, rewards, micro_batch,
                                  jax.random.key(len(times)))
      times[name] = (time.perf_counter() - t0) * 1e3
    assert bool(metrics["applied"]), metrics
  return times["kept"], (times["kept+filtered"] - times["kept"]) / len(filtered[0])


# --------------------------------------------------------------------------------------------------
def bench_reference(size, folder, k, micro_batch, steps):
  """The public code's loop: three eager calls per term with adapter switching, loss / accumulation steps."""
  from diffusers import FluxTransformer2DModel
  from peft import LoraConfig
  model = FluxTransformer2DModel.from_pretrained(folder).train()
  warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # two adapters is the point
  for name in ("default", "old"):
    model.add_adapter(LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, init_lora_weights="gaussian",
                                 target_modules=list(LORA.targets)), adapter_name=name)
  current = {n: p for n, p in model.named_parameters() if ".default." in n}
  old = {n.replace(".default.", ".old."): p for n, p in current.items()}
  named = dict(model.named_parameters())
  with torch.no_grad():
    for n, p in old.items():
      named[n].copy_(p)
  model.set_adapter("default")
  optimizer = torch.optim.AdamW(list(current.values()), lr=NFT.learning_rate, betas=(NFT.adam_b1, NFT.adam_b2),
                                weight_decay=NFT.weight_decay, eps=NFT.adam_eps)
  x0, cond, sigmas = epoch_inputs(size, k, steps)
  t = lambda a: torch.from_numpy(np.array(a))
  x0, ref, text, pooled, guidance = t(x0), t(cond.reference), t(cond.text), t(cond.pooled), t(cond.guidance)
  img_ids, txt_ids = t(cond.img_ids), t(cond.txt_ids)
  advantages = torch.linspace(-1.5, 1.5, k)
  num_terms = NFT.train_timesteps(steps)
  timesteps = torch.from_numpy(sigmas[:-1])
  c, beta = NFT.adv_clip, NFT.beta
  n_tokens = x0.shape[1]

  def predict(xt, tt, rows):
    out = model(hidden_states=torch.cat([xt, ref[rows]], 1), encoder_hidden_states=text[rows],
                pooled_projections=pooled[rows], timestep=tt, img_ids=img_ids, txt_ids=txt_ids,
                guidance=guidance[rows]).sample
    return out[:, :n_tokens]

  def epoch():
    accumulation = (k // micro_batch) * num_terms
    perms = torch.stack([torch.randperm(steps) for _ in range(k)])[:, :num_terms]
    for start in range(0, k, micro_batch):
      rows = torch.arange(start, start + micro_batch)
      for j in range(num_terms):
        tt = timesteps[perms[rows, j]]
        x = x0[rows]
        noise = torch.randn_like(x)
        xt = (1 - tt[:, None, None]) * x + tt[:, None, None] * noise
        model.set_adapter("old")
        with torch.no_grad():
          v_old = predict(xt, tt, rows)
        model.set_adapter("default")
        v = predict(xt, tt, rows)
        with torch.no_grad():
          model.disable_adapters()
          v_ref = predict(xt, tt, rows)
          model.enable_adapters()
          model.set_adapter("default")
        r = (advantages[rows].clamp(-c, c) / c / 2 + 0.5).clamp(0, 1)
        x0_pos = xt - tt[:, None, None] * (beta * v + (1 - beta) * v_old)
        x0_neg = xt - tt[:, None, None] * ((1 + beta) * v_old - beta * v)
        with torch.no_grad():
          w_pos = (x0_pos - x).abs().mean(dim=(1, 2), keepdim=True).clamp(min=NFT.weight_floor)
          w_neg = (x0_neg - x).abs().mean(dim=(1, 2), keepdim=True).clamp(min=NFT.weight_floor)
        l_pos = ((x0_pos - x) ** 2 / w_pos).mean(dim=(1, 2))
        l_neg = ((x0_neg - x) ** 2 / w_neg).mean(dim=(1, 2))
        policy = ((r * l_pos + (1 - r) * l_neg) / beta * c).mean()
        kl = ((v - v_ref) ** 2).mean(dim=(1, 2)).mean()
        ((policy + NFT.kl_weight * kl) / accumulation).backward()
    torch.nn.utils.clip_grad_norm_(list(current.values()), NFT.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():  # old-policy update, schedule 1 after one step
      eta = min(0.001 * 1, 0.5)
      for n, p in current.items():
        named[n.replace(".default.", ".old.")].mul_(eta).add_(p, alpha=1 - eta)

  epoch()  # warm-up
  t0 = time.perf_counter()
  epoch()
  return (time.perf_counter() - t0) * 1e3


def bench(size, k, micro_batch, steps):
  from diffusers import FluxTransformer2DModel
  torch.manual_seed(0)
  with tempfile.TemporaryDirectory() as folder:
    FluxTransformer2DModel(**diffusers_config(size)).save_pretrained(folder)
    t_ref = bench_reference(size, folder, k, micro_batch, steps)
    t_ours, t_filtered = bench_ours(size, folder, k, micro_batch, steps)
  terms = k * NFT.train_timesteps(steps)
  spec = SIZES[size]
  tokens = spec["grid"][0] * spec["grid"][1]
  name = f"{size} (width {spec['heads'] * 64}, {tokens}+{tokens}+{spec['text']} tokens)"
  return [
      (name, f"epoch: {k} rollouts x {NFT.train_timesteps(steps)} timesteps", t_ours, t_ref, t_ours / t_ref),
      (name, "per term (3 predictions + backward)", t_ours / terms, t_ref / terms, t_ours / t_ref),
      (name, "a filtered-out rollout", t_filtered, t_ref / k, t_filtered / (t_ref / k)),
  ]


def main():
  parser = arguments("small,medium")
  parser.add_argument("--group", type=int, default=4, help="k rollouts in the epoch")
  parser.add_argument("--micro-batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=6, help="rollout steps N (T = int(0.99 N) trained)")
  args = parser.parse_args()
  if args.group % args.micro_batch:
    raise ValueError(f"--group {args.group} must be a multiple of --micro-batch {args.micro_batch}")
  same_footing()
  rows = [r for size in args.sizes.split(",") for r in bench(size, args.group, args.micro_batch, args.steps)]
  print(f"device: {jax.devices()[0].device_kind}, float32, torch {torch.__version__} eager, jax {jax.__version__} jit; "
        f"1 double + 1 single block, LoRA rank {LORA.rank}, micro-batch {args.micro_batch}; "
        f"tokens = target + reference + text")
  print_table(("size", "work", "ours ms", "reference ms", "ours/reference"), rows)
  print(f"bf16 MFU: not measured (backend {jax.default_backend()}: no GPU in this run)")
  print(f"nft_step ours/reference time ratio: {rows[-3][4]:.3f}")


if __name__ == "__main__":
  main()
