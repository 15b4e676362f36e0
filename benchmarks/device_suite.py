"""Every device step of an Edit-R1 epoch on the local accelerator, one table: time, FLOP/s, MFU, peak memory, and
the same work in PyTorch (diffusers / transformers) on the same device with the ratio.

  python benchmarks/device_suite.py [--batch 1] [--layers 2,4] [--judge 7b] [--judge_layers 2] [--judge_pairs 2]
      [--qwen_layers 2] [--t5_layers 2] [--repeats 5] [--steps flux_forward,...] [--attention_impl auto,xla]
      [--no_reference] [--isolate auto|yes|no]
  python benchmarks/device_suite.py --quick     # tiny widths, 1 layer each, float32: checks the script on a CPU

Steps (random weights; the dtypes, LoRA, remat, resolution and text lengths of configs/kontext.py and
configs/qwen_image_edit.py; `--batch` rows for the policy, VAE and text-encoder steps):
  flux_forward   FLUX.1-Kontext transformer at full width (3072, 24 heads), `--layers` double,single blocks, 512x512:
                 1024 target + 1024 reference + 128 text tokens, no adapters (`Kontext.abstract_parts`).
  rollout        one network call of the rollout sampler (`rollouts.Sampler`, the config's solver, one step) with the
                 old LoRA r32 adapters on the 8 targets.
  accumulate     `NFTTrainer.accumulate`: int(0.99 N) terms (N = rollout.num_steps), each v with its gradient and
                 v_old / v_ref in one batched call. Reference: the public code's loop (three eager calls per term
                 switching peft adapters, then the backward pass).
  vae_encode/_decode  the whole FLUX VAE at 512x512.
  t5             T5-XXL's width (4096, 64 heads) with `--t5_layers` layers, 128 tokens.
  clip           CLIP-L whole, 77 tokens.
  judge          `reward.mllm.score_step` (the judge's prefill) at Qwen2.5-VL-7B's or 32B's width (`--judge`) with
                 `--judge_layers` decoder layers and the whole vision tower: `--judge_pairs` pairs of two 512x512
                 images (2 x 324 image tokens) + 200 other tokens (`plan.JUDGE_TEXT_TOKENS`), padded to 896.
  qwen_image     the Qwen-Image-Edit-2509 transformer (3072 wide) with `--qwen_layers` blocks, 1024 + 1024 image +
                 384 text tokens.
Full size where it is affordable: the VAE, CLIP, the judge's vision tower; `--layers 19,38` is the whole FLUX.1-Kontext
(24 GB of bfloat16 weights in each framework), `--qwen_layers 60` the whole Qwen-Image.

Columns: median wall time over `--repeats` calls after one warm-up (compile) call; TFLOP/s = the step's matmul and
convolution FLOPs counted on its jaxpr (`editr1_jax.plan.matmul_flops`: every scan at its length, remat
recomputation included, elementwise work not counted) / time; MFU = that / the chip's published peak dense bf16
FLOP/s (`plan.CHIPS`, picked from `jax.devices()[0].device_kind`; "n/a" for a kind without one, e.g. the CPU);
peak memory = `memory_stats()["peak_bytes_in_use"]` of the device (jax) / `torch.cuda.max_memory_allocated` (torch),
"n/a" where the backend keeps no such count. One device, no mesh. Every step runs in its own process (`--isolate`,
the default except with --quick), so its peak is its own and nothing of the previous step is resident. The reference
gets the same inputs (its own random weights) in the same dtype: torch on CUDA on a GPU, torch on the CPU on a CPU
(float32 with --quick); "not installed" / "no CUDA" in its column otherwise.

Measured: `--quick` on this session's 2-core CPU, shared with other jobs, takes 25-40 s wall time (imports included).
No GPU was available in this session: the full-width GPU numbers have not been measured yet, nor has the GPU path
(torch on CUDA next to jax, per-step processes) run; the defaults are sized to take well under 8 minutes on one
H100 / H200, also unmeasured.
"""

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the device with jax
if "--quick" in sys.argv[1:]:
  # One thread in each framework: on a small shared machine another job's thread stalls a multi-threaded call
  # (OpenMP waits a whole scheduler slice at each barrier: 80 ms calls of a 0.2 ms model on 2 busy cores).
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false",
                                      "intra_op_parallelism_threads=1"]).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import median_ms, print_table, same_footing  # noqa: E402
from configs import kontext as kontext_config  # noqa: E402
from configs import qwen_image_edit as qwen_config  # noqa: E402
from editr1_jax import attention, latents, nft, plan, rollouts, sampling, train_loop  # noqa: E402
from editr1_jax import sharding as shd  # noqa: E402
from editr1_jax.families import kontext, qwen_image  # noqa: E402
from editr1_jax.models import autoencoder, clip, qwen2_5_vl, t5  # noqa: E402
from editr1_jax.models import qwen_image as qwen_image_model  # noqa: E402
from editr1_jax.reward import mllm  # noqa: E402
from editr1_jax.reward import processor as proc  # noqa: E402

STEPS = ("flux_forward", "rollout", "accumulate", "vae_encode", "vae_decode", "t5", "clip", "judge", "qwen_image")
ROW_MARK = "DEVICE_SUITE_ROW "  # how an isolated step's process hands its row back
# device_kind substrings -> `plan.CHIPS` key, first match wins (TPU v5e / v6e report "v5 lite" / "v6 lite", v5p "v5");
# None: a kind whose peak `plan.CHIPS` does not hold (the H100 entry is the SXM part).
CHIP_KINDS = (("h200", "h200"), ("h100 pcie", None), ("h100", "h100"), ("v6 lite", "v6e"), ("v6e", "v6e"),
              ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("tpu v5", "v5p"), ("tpu v4", "v4"))


def chip_of(device_kind: str) -> plan.Chip | None:
  kind = device_kind.lower()
  return next((plan.CHIPS[key] if key else None for pattern, key in CHIP_KINDS if pattern in kind), None)


# --------------------------------------------------------------------------------------------------
# Options
@dataclasses.dataclass(frozen=True)
class Options:
  quick: bool
  batch: int
  layers: tuple[int, int]
  judge: str
  judge_layers: int
  judge_pairs: int
  qwen_layers: int
  t5_layers: int
  repeats: int
  attention_impl: str  # one kernel choice (attention.IMPLEMENTATIONS) for every network of the step
  no_reference: bool


QUICK = dict(layers=(1, 1), judge_layers=1, qwen_layers=1, t5_layers=1, repeats=2)
FULL = dict(layers=(2, 4), judge_layers=2, qwen_layers=2, t5_layers=2, repeats=5)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny widths, 1 layer each, float32 (checks the script)")
  p.add_argument("--batch", type=int, default=1, help="rows of the policy, VAE and text-encoder steps")
  p.add_argument("--layers", default=None, help="FLUX double,single blocks (default 2,4; --quick 1,1)")
  p.add_argument("--judge", choices=("7b", "32b"), default="7b", help="the judge's width")
  p.add_argument("--judge_layers", type=int, default=None, help="judge decoder layers (default 2)")
  p.add_argument("--judge_pairs", type=int, default=2, help="(source, edit) pairs in one judge call")
  p.add_argument("--qwen_layers", type=int, default=None, help="Qwen-Image transformer blocks (default 2)")
  p.add_argument("--t5_layers", type=int, default=None, help="T5 encoder layers (default 2)")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per step (default 5; --quick 2)")
  p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
  p.add_argument("--attention_impl", default="auto,xla",
                 help="comma-separated kernel choices, each step run with each (default auto,xla: the platform's "
                      "kernel, then XLA's, to see what the kernel buys); choices giving the same kernel run once")
  p.add_argument("--no_reference", action="store_true", help="skip the PyTorch side")
  p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                 help="one process per step, so each peak memory is the step's own (auto: yes unless --quick)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  return p


def options(args) -> tuple[Options, list[str]]:
  """Checked options and steps; an error names the flag."""
  defaults = QUICK if args.quick else FULL
  layers = defaults["layers"]
  if args.layers is not None:
    try:
      layers = tuple(int(v) for v in args.layers.split(","))
    except ValueError:
      layers = ()
    if len(layers) != 2 or min(layers) < 0 or max(layers) < 1:
      raise SystemExit(f"--layers={args.layers!r}: expected two block counts 'double,single', e.g. 2,4")
  pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)
  kernels = [k for k in args.attention_impl.split(",") if k]
  bad = [k for k in kernels if k not in attention.IMPLEMENTATIONS]
  if bad or not kernels:
    raise SystemExit(f"--attention_impl={args.attention_impl!r}: unknown {bad}; expected a subset of "
                     f"{','.join(attention.IMPLEMENTATIONS)}")
  opts = Options(args.quick, args.batch, layers, args.judge, pick("judge_layers"), args.judge_pairs,
                 pick("qwen_layers"), pick("t5_layers"), pick("repeats"), kernels[0], args.no_reference)
  for name in ("batch", "judge_layers", "judge_pairs", "qwen_layers", "t5_layers", "repeats"):
    if getattr(opts, name) < 1:
      raise SystemExit(f"--{name}={getattr(opts, name)}: must be at least 1")
  steps = [s for s in args.steps.split(",") if s]
  unknown = [s for s in steps if s not in STEPS]
  if unknown or not steps:
    raise SystemExit(f"--steps={args.steps!r}: unknown {unknown}; expected a subset of {','.join(STEPS)}")
  return opts, steps, kernels


def run_config(module, opts: Options, *, lora: bool = True):
  """The paper's config (`module.get_config()`); with --quick its tiny preset in float32 at 64x64 and 16 text
  tokens. Without `lora` the network is built without adapters (the config's full fine-tune switch)."""
  c = module.get_config()
  if opts.quick:
    c.model.preset = "tiny"
    c.model.dtype = c.model.param_dtype = c.reward.dtype = "float32"
    c.data.resolution, c.data.t5_max_length, c.data.text_max_length = 64, 16, 16
  c.model.attention_impl = opts.attention_impl
  c.optim.full_finetune = not lora
  return c


# --------------------------------------------------------------------------------------------------
# What a step is
@dataclasses.dataclass
class Ours:
  call: Callable[[], Any]  # one timed call
  traced: Any  # `jax.stages.Traced` of that call's jitted function, for its FLOP count


@dataclasses.dataclass
class Step:
  shapes: str
  ours: Callable[[], Ours]  # builds the model (random weights, on the device) and the call
  reference: Callable[[Any], Callable[[], Any]]  # (Torch) -> one timed call; its imports happen inside
  grad: bool = False  # the reference call manages its own autograd (otherwise it runs under no_grad)


@dataclasses.dataclass(frozen=True)
class Torch:
  """Where and in what dtype the PyTorch reference runs."""
  torch: Any
  device: str
  dtype: Any

  def tensor(self, x, dtype=None):
    """A host array on the reference's device: floats in `dtype` (default the compute dtype), integers as int64."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
      return self.torch.from_numpy(x.astype(np.int64)).to(self.device)
    return self.torch.from_numpy(x.astype(np.float32)).to(self.device, dtype or self.dtype)

  def build(self, make):
    """A module built straight on the device (no host-side initialisation), in the compute dtype, eval mode."""
    with self.torch.device(self.device):
      return self.to(make()).eval()

  def to(self, module):
    """The module in the compute dtype (`nn.Module.to`: diffusers' own `to` warns on every dtype change)."""
    return self.torch.nn.Module.to(module, self.device, self.dtype)

  def sync(self, _=None):
    if self.device == "cuda":
      self.torch.cuda.synchronize()


POOL = 1 << 20  # values of the one normal draw every random weight is a window of


def build(make: Callable[[], nnx.Module], seed: int = 0):
  """(graphdef, state) of a module with random weights made on the device in one small compiled call: each weight
  tensor a window of one shared normal draw scaled by 1/sqrt(fan-in), norm scales 1, biases 0. The modules' own
  initialisers draw every tensor separately, which compiles for seconds per model (10 s for the tiny VAE on a busy
  CPU); no step's time depends on the values."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)

  def fill():
    pool = jax.random.normal(jax.random.key(seed), (POOL,), jnp.float32)
    out = []
    for i, (path, x) in enumerate(flat):
      if len(x.shape) < 2:
        name = getattr(path[-2], "key", None) if len(path) > 1 else None
        out.append(jnp.full(x.shape, 1.0 if name == "scale" else 0.0, x.dtype))
        continue
      n, start = math.prod(x.shape), (7919 * i) % POOL
      values = jnp.tile(pool, -(-(start + n) // POOL))[start:start + n]
      out.append((values * math.prod(x.shape[:-1]) ** -0.5).reshape(x.shape).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

  return graphdef, jax.jit(fill)()


def host_values(tree, seed: int = 0):
  """Host arrays for a tree of abstract arrays: normal draws for floats, ones for integers (masks)."""
  rng = np.random.default_rng(seed)
  draw = lambda x: (rng.standard_normal(x.shape).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                    else np.ones(x.shape, x.dtype))
  return jax.tree.map(draw, tree)


def jitted(fn, *args) -> Ours:
  return Ours(lambda: fn(*args), fn.trace(*args))


def single_mesh():
  return shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])


# --------------------------------------------------------------------------------------------------
# FLUX.1-Kontext: forward, rollout call, NFT accumulate
def kontext_inputs(opts: Options, *, lora: bool):
  """(config, transformer constructor, its config, host condition rows, host latents (B, L, C), grid)."""
  config = run_config(kontext_config, opts, lora=lora)
  make, condition, grid, channels = kontext.Kontext.abstract_parts(config, opts.layers)
  cond = host_values(condition(opts.batch, single_mesh(), shd.DEFAULT_RULES))
  text = cond.text.shape[1]
  cond = cond.replace(img_ids=np.concatenate([latents.target_ids(*grid), latents.reference_ids(*grid)]),
                      txt_ids=np.zeros((text, 3), np.float32), guidance=np.full(opts.batch, 2.5, np.float32))
  z = np.random.default_rng(1).standard_normal((opts.batch, grid[0] * grid[1], channels)).astype(np.float32)
  return config, make, nnx.eval_shape(make).cfg, cond, z, grid


def flux_shapes(cfg, cond, z) -> str:
  n, text = z.shape[1], cond.text.shape[1]
  return f"B{len(z)}, {n}+{n}+{text} tok, {cfg.inner_dim} wide, {cfg.num_layers}+{cfg.num_single_layers} blocks"


def torch_flux(tc: Torch, cfg, adapters=(), lora=None):
  """diffusers' FLUX transformer of `cfg`'s sizes with a peft LoRA adapter per name in `adapters`."""
  from diffusers import FluxTransformer2DModel
  kw = {k: v for k, v in cfg.to_diffusers_config().items() if k != "_class_name"}
  model = tc.build(lambda: FluxTransformer2DModel(**kw))
  if adapters:
    from peft import LoraConfig
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # two adapters is the point
    for name in adapters:
      model.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights="gaussian",
                                   target_modules=list(lora.targets)), adapter_name=name)
    tc.to(model)
  return model


def torch_flux_call(tc: Torch, model, z, sigma, cond):
  """diffusers' forward on the same rows as `kontext.velocity`: [target | reference] tokens, the target's output."""
  kw = dict(hidden_states=tc.tensor(np.concatenate([z, np.asarray(cond.reference, np.float32)], 1)),
            encoder_hidden_states=tc.tensor(cond.text), pooled_projections=tc.tensor(cond.pooled),
            timestep=tc.tensor(sigma), guidance=tc.tensor(cond.guidance),
            img_ids=tc.tensor(cond.img_ids, tc.torch.float32), txt_ids=tc.tensor(cond.txt_ids, tc.torch.float32))
  return lambda: model(**kw).sample[:, :z.shape[1]]


def step_flux_forward(opts: Options) -> Step:
  _, make, cfg, cond, z, _ = kontext_inputs(opts, lora=False)
  sigma = np.full(opts.batch, 0.5, np.float32)

  def ours():
    graphdef, state = build(make)
    fn = jax.jit(lambda s, z, t, c: kontext.velocity(nnx.merge(graphdef, s), z, t, c))
    return jitted(fn, state, *jax.device_put((z, sigma, cond)))

  return Step(flux_shapes(cfg, cond, z), ours, lambda tc: torch_flux_call(tc, torch_flux(tc, cfg), z, sigma, cond))


def nft_parts(config, make):
  """(trainer, its initial state, frozen weights) of a family's policy, as `train_loop` builds them."""
  graphdef, state = build(make)
  trainer, params, frozen = train_loop.build_nft_trainer(config, kontext.Kontext, nnx.merge(graphdef, state))
  return trainer, trainer.init(params), frozen


def step_rollout(opts: Options) -> Step:
  config, make, cfg, cond, z, grid = kontext_inputs(opts, lora=True)
  solver, lora = config.rollout.sampler, cfg.lora
  sigmas = np.asarray([1.0, 0.0], np.float32)  # one step: one network call

  def ours():
    trainer, state, frozen = nft_parts(config, make)
    family = types.SimpleNamespace(velocity=kontext.velocity, mesh=None, rules=shd.DEFAULT_RULES)
    sampler = rollouts.Sampler(family, lambda states: trainer.policy.model(*states),
                               noise_level=config.rollout.sde_noise)
    keys = jax.random.split(jax.random.key(0), opts.batch)
    states, rows, noise = (state.old_params, frozen), jax.device_put(cond), jnp.asarray(z)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    return Ours(lambda: sampler(states, rows, keys, sigmas, grid=grid, solver=solver, noise=noise),
                sampler.trace(states, rows, noise, jnp.asarray(sigmas), step_keys, solver=solver))

  def reference(tc):
    model = torch_flux(tc, cfg, ("default",), lora)
    return torch_flux_call(tc, model, z, np.ones(opts.batch, np.float32), cond)

  return Step(f"{flux_shapes(cfg, cond, z)}, one {solver} step, LoRA r{lora.rank}", ours, reference)


def step_accumulate(opts: Options) -> Step:
  config, make, cfg, cond, z, grid = kontext_inputs(opts, lora=True)
  num_steps, lora = config.rollout.num_steps, cfg.lora
  terms = train_loop.nft_config(config).train_timesteps(num_steps)
  sigmas = sampling.shifted_sigmas(num_steps, grid[0] * grid[1])

  def ours():
    trainer, state, frozen = nft_parts(config, make)
    b = opts.batch
    batch = jax.device_put(nft.TrainBatch(
        x0=z, cond=cond, sigmas=np.broadcast_to(sigmas[:-1], (b, num_steps)).copy(),
        advantages=np.linspace(-1, 1, b).astype(np.float32), mask=np.ones(b, np.float32),
        index=np.arange(b, dtype=np.int32)))
    key = jax.random.key(0)
    traced = trainer.accumulate.trace(state, frozen, batch, key)
    held = [state]  # the state is donated: each call takes the previous call's

    def call():
      held[0], metrics = trainer.accumulate(held[0], frozen, batch, key)
      return held[0], metrics

    return Ours(call, traced)

  def reference(tc):
    """The public code's term: v_old (old adapter) and v_ref (adapters off) without gradient, v with it."""
    torch = tc.torch
    model = torch_flux(tc, cfg, ("default", "old"), lora).train()  # dropout is 0 everywhere in FLUX
    forward = torch_flux_call(tc, model, z, np.full(opts.batch, 0.5, np.float32), cond)

    def call():
      model.zero_grad(set_to_none=True)
      for _ in range(terms):
        with torch.no_grad():
          model.set_adapter("old")
          v_old = forward()
          model.disable_adapters()
          v_ref = forward()
          model.enable_adapters()
        model.set_adapter("default")
        v = forward().float()
        (torch.square(v - v_old.float()).mean() + torch.square(v - v_ref.float()).mean()).backward()

    return call

  shapes = f"B{opts.batch} x {terms} terms (v + grad, v_old|v_ref in one call), LoRA r{lora.rank}, " \
           f"{cfg.num_layers}+{cfg.num_single_layers} blocks"
  return Step(shapes, ours, reference, grad=True)


# --------------------------------------------------------------------------------------------------
# FLUX VAE
def vae_parts(opts: Options):
  config = run_config(kontext_config, opts)
  runtime = dict(dtype=config.model.dtype, param_dtype=config.model.dtype,  # the family loads it so
                 attention_impl=config.model.attention_impl)
  cfg = autoencoder.tiny(**runtime) if opts.quick else autoencoder.flux(**runtime)
  side = config.data.resolution
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (opts.batch, side, side, 3)).astype(np.float32)
  lat = side // cfg.downsample_factor
  codes = rng.standard_normal((opts.batch, lat, lat, cfg.latent_channels)).astype(np.float32)
  make = lambda: autoencoder.Autoencoder(cfg, rngs=nnx.Rngs(0))
  shapes = f"B{opts.batch}, {side}x{side} px, latents {lat}x{lat}x{cfg.latent_channels}, " \
           f"widths {cfg.block_out_channels}"
  return cfg, make, images, codes, shapes


def torch_vae(tc: Torch, cfg):
  from benchmarks.vae_codec import diffusers_model  # imports torch
  return tc.build(lambda: diffusers_model(cfg))


def nchw(tc: Torch, x):
  return tc.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def step_vae_encode(opts: Options) -> Step:
  cfg, make, images, _, shapes = vae_parts(opts)

  def ours():
    graphdef, state = build(make)
    return jitted(jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)), state, jnp.asarray(images))

  def reference(tc):
    model, x = torch_vae(tc, cfg), nchw(tc, images)
    return lambda: model.encode(x).latent_dist.mode()

  return Step(shapes, ours, reference)


def step_vae_decode(opts: Options) -> Step:
  cfg, make, _, codes, shapes = vae_parts(opts)

  def ours():
    graphdef, state = build(make)
    return jitted(jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z)), state, jnp.asarray(codes))

  def reference(tc):
    model, z = torch_vae(tc, cfg), nchw(tc, codes)
    return lambda: model.decode(z).sample

  return Step(shapes, ours, reference)


# --------------------------------------------------------------------------------------------------
# Text encoders (as `conditioning.encode_prompts` calls them)
def text_step(cfg, make, ids, output: Callable, torch_model: Callable, torch_output: Callable,
              shapes: str) -> Step:
  def ours():
    graphdef, state = build(make)
    return jitted(jax.jit(lambda s, x: output(nnx.merge(graphdef, s)(x))), state, jnp.asarray(ids))

  def reference(tc):
    model, x = tc.build(lambda: torch_model(cfg)), tc.tensor(ids)
    return lambda: torch_output(model(input_ids=x))

  return Step(shapes, ours, reference)


def step_t5(opts: Options) -> Step:
  config = run_config(kontext_config, opts)
  runtime = dict(dtype=config.model.dtype, param_dtype=config.model.dtype, attention_impl=config.model.attention_impl)
  cfg = dataclasses.replace(t5.tiny(**runtime) if opts.quick else t5.t5_xxl(**runtime), num_layers=opts.t5_layers)
  ids = np.random.default_rng(3).integers(2, cfg.vocab_size, (opts.batch, config.data.t5_max_length))

  def torch_model(cfg):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(feed_forward_proj="gated-gelu",
                                   **{k: getattr(cfg, k) for k in cfg._TRANSFORMERS_KEYS}))

  shapes = f"B{opts.batch}, {ids.shape[1]} tok, {cfg.d_model} wide, {cfg.num_layers} layers"
  return text_step(cfg, lambda: t5.T5EncoderModel(cfg, rngs=nnx.Rngs(0)), ids, lambda out: out,
                   torch_model, lambda out: out.last_hidden_state, shapes)


def step_clip(opts: Options) -> Step:
  config = run_config(kontext_config, opts)
  runtime = dict(dtype=config.model.dtype, param_dtype=config.model.dtype, attention_impl=config.model.attention_impl)
  cfg = clip.tiny(**runtime) if opts.quick else clip.clip_l(**runtime)
  if opts.quick:
    cfg = dataclasses.replace(cfg, num_hidden_layers=1)
  length = cfg.max_position_embeddings
  ids = np.random.default_rng(4).integers(0, cfg.vocab_size - 1, (opts.batch, length))
  ids[:, length // 4] = cfg.vocab_size - 1  # end of text: the highest id

  def torch_model(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel
    sizes = {k: getattr(cfg, k) for k in cfg._TRANSFORMERS_KEYS}
    return CLIPTextModel(CLIPTextConfig(bos_token_id=cfg.vocab_size - 2, **sizes))  # CLIP-L's start of text

  shapes = f"B{opts.batch}, {length} tok, {cfg.hidden_size} wide, {cfg.num_hidden_layers} layers"
  return text_step(cfg, lambda: clip.CLIPTextModel(cfg, rngs=nnx.Rngs(0)), ids, lambda out: out[1],
                   torch_model, lambda out: out.pooler_output, shapes)


# --------------------------------------------------------------------------------------------------
# The judge's prefill
def judge_inputs(cfg, pairs: int, side: int, text_tokens: int, length_multiple: int = 64):
  """Host (token ids, mask, pixel values, image grids) of `pairs` pairs of side x side images as `MllmJudge` lays a
  call out: text, the two images' pads between their markers, left padding to a multiple of `length_multiple`."""
  image_cfg = proc.ImageProcessorConfig(*proc.DEFAULT_PIXELS)
  h, w = image_cfg.resized(side, side)
  grid = (1, h // image_cfg.patch_size, w // image_cfg.patch_size)
  pads = image_cfg.num_tokens(grid)
  rng = np.random.default_rng(5)
  image = [cfg.vision_start_token_id] + [cfg.image_token_id] * pads + [cfg.vision_end_token_id]
  plain = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)  # ids below the markers
  text = rng.integers(0, plain, max(text_tokens - 4, 2)).tolist()  # the 4 markers count as text (plan.judge_batch)
  row = text[:len(text) // 4] + image + image + text[len(text) // 4:]
  length = -(-len(row) // length_multiple) * length_multiple
  ids = np.zeros((pairs, length), np.int32)
  ids[:, length - len(row):] = row
  mask = np.zeros((pairs, length), bool)
  mask[:, length - len(row):] = True
  pixels = rng.standard_normal((2 * pairs * int(np.prod(grid)), cfg.vision.patch_dim)).astype(np.float32)
  return ids, mask, pixels, np.asarray([grid] * (2 * pairs)), pads


def torch_judge_config(cfg):
  """transformers' Qwen2.5-VL config of `cfg`'s sizes (the tests' builder, every size given)."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from qwen_fixtures import tiny_config
  v = cfg.vision
  ids = {"<|image_pad|>": cfg.image_token_id, "<|vision_start|>": cfg.vision_start_token_id,
         "<|vision_end|>": cfg.vision_end_token_id, "<|video_pad|>": cfg.image_token_id + 1, "<|endoftext|>": 0,
         "<|im_end|>": 1}
  text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
              max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                                                              "mrope_section": list(cfg.mrope_section)})
  vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
                out_hidden_size=v.out_hidden_size, window_size=v.window_size,
                fullatt_block_indexes=list(v.fullatt_block_indexes), patch_size=v.patch_size,
                spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
  return tiny_config(ids, text=text, vision=vision)


def step_judge(opts: Options) -> Step:
  config = run_config(kontext_config, opts)
  runtime = dict(dtype=config.reward.dtype, param_dtype=config.reward.dtype,
                 attention_impl=config.model.attention_impl)
  preset = qwen2_5_vl.tiny if opts.quick else {"7b": qwen2_5_vl.qwen2_5_vl_7b, "32b": qwen2_5_vl.qwen2_5_vl_32b}[
      opts.judge]
  cfg = preset(**runtime).replace(num_hidden_layers=opts.judge_layers)
  text_tokens = 32 if opts.quick else plan.JUDGE_TEXT_TOKENS
  side = 112 if opts.quick else config.data.resolution
  ids, mask, pixels, grids, pads = judge_inputs(cfg, opts.judge_pairs, side, text_tokens)
  digit_ids = np.arange(len(mllm.DIGITS), dtype=np.int32)  # which columns does not change the cost

  def ours():
    graphdef, state = build(lambda: qwen2_5_vl.Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    fn = jax.jit(lambda s, b, p: mllm.score_step(graphdef, digit_ids, None, shd.DEFAULT_RULES, s, b, p))
    batch = jax.device_put(qwen2_5_vl.prepare_batch(ids, mask, pixels, grids, cfg))
    positions = jnp.full((len(ids), 1), ids.shape[1] - 1, jnp.int32)
    return jitted(fn, state, batch, positions)

  def reference(tc):
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = tc.build(lambda: Qwen2_5_VLForConditionalGeneration(torch_judge_config(cfg)))
    x = tc.tensor(ids)
    kw = dict(input_ids=x, attention_mask=tc.tensor(mask), mm_token_type_ids=(x == cfg.image_token_id).int(),
              pixel_values=tc.tensor(pixels), image_grid_thw=tc.tensor(grids), logits_to_keep=1)
    return lambda: model(**kw).logits

  shapes = f"{len(ids)} pairs x {ids.shape[1]} tok ({2 * pads} image), {cfg.hidden_size} wide, " \
           f"{cfg.num_hidden_layers} layers, vision {cfg.vision.depth}x{cfg.vision.hidden_size}"
  return Step(shapes, ours, reference)


# --------------------------------------------------------------------------------------------------
# Qwen-Image-Edit-2509's transformer
def step_qwen_image(opts: Options) -> Step:
  config = run_config(qwen_config, opts, lora=False)
  make, condition, grid, channels = qwen_image.QwenImageEdit.abstract_parts(config, (opts.qwen_layers,))
  cfg = nnx.eval_shape(make).cfg
  cond = host_values(condition(opts.batch, single_mesh(), shd.DEFAULT_RULES))
  shapes_per_row = [(1, *grid), (1, *grid)]  # the target, then the condition image
  image_positions, text_positions = qwen_image_model.rope_positions([shapes_per_row], cond.prompt.embeds.shape[1])
  cond = cond.replace(image_positions=image_positions, text_positions=text_positions)
  z = np.random.default_rng(6).standard_normal((opts.batch, grid[0] * grid[1], channels)).astype(np.float32)
  sigma = np.full(opts.batch, 0.5, np.float32)

  def ours():
    graphdef, state = build(make)
    fn = jax.jit(lambda s, z, t, c: qwen_image.velocity(nnx.merge(graphdef, s), z, t, c))
    return jitted(fn, state, *jax.device_put((z, sigma, cond)))

  def reference(tc):
    from diffusers import QwenImageTransformer2DModel
    kw = {k: v for k, v in cfg.to_diffusers_config().items() if k != "_class_name"}
    model = tc.build(lambda: QwenImageTransformer2DModel(**kw))
    args = dict(hidden_states=tc.tensor(np.concatenate([z, np.asarray(cond.reference, np.float32)], 1)),
                encoder_hidden_states=tc.tensor(cond.prompt.embeds),
                encoder_hidden_states_mask=tc.tensor(cond.prompt.mask), timestep=tc.tensor(sigma),
                img_shapes=[shapes_per_row] * opts.batch)
    return lambda: model(**args).sample[:, :z.shape[1]]

  n, text = z.shape[1], cond.prompt.embeds.shape[1]
  return Step(f"B{opts.batch}, {n}+{n}+{text} tok, {cfg.inner_dim} wide, {cfg.num_layers} blocks", ours, reference)


BUILDERS = dict(flux_forward=step_flux_forward, rollout=step_rollout, accumulate=step_accumulate,
                vae_encode=step_vae_encode, vae_decode=step_vae_decode, t5=step_t5, clip=step_clip, judge=step_judge,
                qwen_image=step_qwen_image)


# --------------------------------------------------------------------------------------------------
# Running
def torch_context(opts: Options) -> tuple[Torch | None, str]:
  """(where the reference runs, "") or (None, why it does not)."""
  if opts.no_reference:
    return None, "skipped (--no_reference)"
  try:
    import torch
  except ImportError:
    return None, "not installed"
  backend = jax.default_backend()
  if backend == "cpu":
    device = "cpu"
  elif backend in ("gpu", "cuda") and torch.cuda.is_available():
    device = "cuda"
  else:
    return None, "no CUDA"
  return Torch(torch, device, torch.float32 if opts.quick else torch.bfloat16), ""


def device_peak() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


def short(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:70]}"


def run_reference(step: Step, opts: Options, tc: Torch) -> dict:
  torch = tc.torch
  try:
    if tc.device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    with torch.enable_grad() if step.grad else torch.no_grad():
      call = step.reference(tc)
      ms = median_ms(call, repeats=opts.repeats, block=tc.sync)
    peak = int(torch.cuda.max_memory_allocated()) if tc.device == "cuda" else None
    return dict(ref_ms=ms, ref_peak=peak)
  except ImportError as e:
    return dict(ref_note=f"not installed ({e.name or e})")
  except Exception as e:  # a reference failure (e.g. out of memory) leaves our row standing
    return dict(ref_note=f"failed: {short(e)}")
  finally:
    call = None
    gc.collect()
    if tc.device == "cuda":
      torch.cuda.empty_cache()


def run_step(name: str, opts: Options, tc: Torch | None, why: str) -> dict:
  """One row: the reference first (its memory given back after), then ours; with where both ran."""
  device = jax.devices()[0]
  reference = (f"torch {tc.torch.__version__} eager on {tc.device}, {str(tc.dtype).replace('torch.', '')}" if tc
               else f"PyTorch reference: {why}")
  row = dict(step=name, kind=device.device_kind, backend=jax.default_backend(), reference=reference,
             attention=kernel_label(opts))
  try:
    step = BUILDERS[name](opts)
    row["shapes"] = step.shapes
    row.update(run_reference(step, opts, tc) if tc else dict(ref_note=why))
    ours = step.ours()
    row["flops"] = plan.matmul_flops(ours.traced.jaxpr.jaxpr)
    row["ms"] = median_ms(ours.call, repeats=opts.repeats, block=jax.block_until_ready)
    row["peak"] = device_peak()
  except Exception as e:  # one failing step (e.g. out of memory) does not cost the others their rows
    row["error"] = short(e)
  return row


def policy_kernel(opts: Options, choice: str) -> str:
  """The kernel a choice gives the policy's attention here (heads of 128, the compute dtype)."""
  return attention.resolve(choice, "float32" if opts.quick else "bfloat16", 128)


def kernel_label(opts: Options) -> str:
  return f"{opts.attention_impl} ({policy_kernel(opts, opts.attention_impl)})"


def distinct_kernels(opts: Options, kernels: list[str]) -> list[str]:
  """The choices that give different kernels here, the first of each kept."""
  seen, kept = set(), []
  for k in kernels:
    resolved = policy_kernel(opts, k)
    if resolved not in seen:
      seen.add(resolved)
      kept.append(k)
  return kept


def run_isolated(name: str, kernel: str) -> dict:
  """The step in a fresh process (same flags, one kernel choice): its peak memory is its own."""
  argv = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:] + ["--child", name, f"--attention_impl={kernel}"]
  done = subprocess.run(argv, capture_output=True, text=True)
  for line in done.stdout.splitlines():
    if line.startswith(ROW_MARK):
      return json.loads(line[len(ROW_MARK):])
  tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
  return dict(step=name, attention=kernel, error=f"process exited {done.returncode}: {tail[:90]}")


def table_row(row: dict, chip: plan.Chip | None) -> tuple:
  fmt_bytes = lambda b: "n/a" if b is None else plan.format_bytes(b)
  ref_ms = row.get("ref_ms")
  ref = (f"{ref_ms:.2f}" if ref_ms is not None else row.get("ref_note", "-"),
         fmt_bytes(row.get("ref_peak")) if ref_ms is not None else "-")
  if "error" in row:
    return (row["step"], row.get("attention", "-"), row.get("shapes", "-"), f"failed: {row['error']}", "-", "-",
            "-") + ref + ("-",)
  flops_per_s = row["flops"] / (row["ms"] / 1e3)
  mfu = f"{100 * flops_per_s / chip.bf16_flops:.1f}%" if chip else "n/a"
  ratio = f"{row['ms'] / ref_ms:.3g}" if ref_ms else "-"
  # Three significant figures, not three decimals: a quick CPU run of a small step is well under 0.0005 TFLOP/s on
  # a slow machine, and a rate printed as 0.000 would read as no work done.
  return (row["step"], row["attention"], row["shapes"], f"{row['ms']:.2f}", f"{flops_per_s / 1e12:.3g}", mfu,
          fmt_bytes(row["peak"])) \
      + ref + (ratio,)


def report(rows: list[dict], opts: Options, isolated: bool) -> None:
  first = next((r for r in rows if "kind" in r), dict(kind="unknown", backend="unknown", reference="unknown"))
  chip = chip_of(first["kind"])
  dtype = "float32 (--quick)" if opts.quick else "bfloat16 compute (configs/kontext.py)"
  peak = (f"MFU against {chip.name}'s {chip.bf16_flops / 1e12:.0f} TFLOP/s dense bf16" if chip else
          f"MFU n/a: no published peak for device kind {first['kind']!r}")
  counted = any(r.get("peak") is not None for r in rows)
  print(f"device: {first['kind']} ({first['backend']}, jax {jax.__version__}); {dtype}; {peak}")
  memory = "per step (one process each)" if isolated else "the running maximum of one process"
  memory += "" if counted else ": n/a, the device keeps no count"
  print(f"{first['reference']}; FLOPs: matmuls + convolutions counted on each step's jaxpr (plan.matmul_flops, scans "
        f"at their length, remat included); peak memory {memory}")
  print_table(("step", "attention", "shapes", "ms", "TFLOP/s", "MFU", "peak mem", "torch ms", "torch peak", "ours/torch"),
              [table_row(r, chip) for r in rows])


def main():
  args = parser().parse_args()
  opts, steps, kernels = options(args)
  # Isolated steps leave the device to the step processes: the parent never starts a backend (a TPU takes one
  # process at a time). --quick checks the script, in one process.
  isolate = args.isolate == "yes" or (args.isolate == "auto" and not opts.quick)
  t0 = time.perf_counter()
  if isolate and not args.child:  # the parent starts no backend: every choice runs (auto differs from xla there)
    rows = [run_isolated(s, k) for s in steps for k in kernels]
  else:
    tc, why = torch_context(opts)
    if tc is not None and tc.device == "cpu" and opts.quick:
      tc.torch.set_num_threads(1)  # one thread each (see the top)
    elif tc is not None and tc.device == "cpu":
      same_footing()  # every core for torch
    if args.child:
      print(ROW_MARK + json.dumps(run_step(args.child, opts, tc, why)), flush=True)
      return
    rows = [run_step(s, dataclasses.replace(opts, attention_impl=k), tc, why) for s in steps
            for k in distinct_kernels(opts, kernels)]
  report(rows, opts, isolate)
  print(f"device_suite: {len(rows)} steps in {time.perf_counter() - t0:.1f} s wall time")


if __name__ == "__main__":
  main()
