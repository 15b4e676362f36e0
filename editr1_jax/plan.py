"""Plan a run without its hardware: compile one epoch's device steps for a named topology and read back what
each step needs per chip (`launch/plan.py`).

Every model is built abstractly (`jax.eval_shape`: no weights read, nothing full-size allocated on the host); the
steps are the jitted functions the run itself calls (the family's prompt encoding, the VAE's encode and decode,
the rollout `rollouts.Sampler`, `nft.NFTTrainer`'s accumulate / apply / update_old) on the rows the run gives them
(prompt encoding, encode and decode: a rollout chunk), lowered with abstract inputs that carry the shardings the
run gives them, and compiled for the topology's devices: the local CPU devices, the local GPUs, or compile-only TPU
devices from libtpu (`jax.experimental.topologies`).

What a row says, per chip: argument / output / aliased (donated) / temporary bytes from
`compiled.memory_analysis()` (on TPU with layout padding: small dimensions are padded to tiles); FLOPs and bytes
accessed from `compiled.cost_analysis()`. XLA's cost analysis counts a loop body once, so both are multiplied by
the step's loop factor: the step's matmul/convolution FLOPs counted on its jaxpr with every `scan` at its length,
over the same count with every scan once (an estimate that assumes the loop body dominates, as it does for the
sampler's steps, the NFT timesteps and the transformer's scanned blocks). The roofline time is max(FLOPs / peak
bf16 FLOP/s, bytes accessed / HBM bandwidth) of the chip (`CHIPS`); "fits" compares with the HBM the TPU compiler
lets a program use. "Live" adds to the step's own peak the train state, frozen weights and the MLLM judge's
parameters (unless offloaded) and the VAE and text encoders (`Family.abstract_encoders`) that stay resident between
steps but are not its arguments.

The judge's prefill ("judge prefill", `config.reward.kind == "mllm"` only) is `reward.mllm.score_step` on a full
scoring call: `config.reward.batch_size` pairs (rounded up to the data-parallel width), each two images of
`config.data.resolution` squared resized by the judge's image-processor rules, plus `JUDGE_TEXT_TOKENS` of prompt,
padded to `mllm.MllmJudge`'s length multiple. Its size: `judge=` (7b / 32b / tiny), else `config.reward.model_dir`'s
config.json (never its weights), else tiny for `config.reward.tiny`, else 32b.
"""

import dataclasses
import functools
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from editr1_jax import families, latents, nft, paths, rollouts, train_loop
from editr1_jax import sharding as shd
from editr1_jax import tiny as tiny_lib
from editr1_jax import weights as wio
from editr1_jax.models import qwen2_5_vl
from editr1_jax.reward import mllm
from editr1_jax.reward import processor as proc

GiB = 1024 ** 3
LIBTPU_HINT = "pip install libtpu==0.0.42.1"
STEPS = ("text", "encode", "rollout", "decode", "judge", "accumulate", "apply", "update_old")
JUDGES = ("7b", "32b", "tiny")
# Text tokens of one judging turn besides the image pads (chat template, the shipped judging prompt with an
# instruction and requirement, vision start/end markers): 200, as benchmarks/reward_prefill.py counted one pair
# at 512x512 (848 tokens, 2 x 324 of them image pads). Longer instructions add a few.
JUDGE_TEXT_TOKENS = 200


# --------------------------------------------------------------------------------------------------
# Chips: published figures (dense bf16 peak, HBM capacity and bandwidth, host link per chip), and the HBM a TPU
# program may use: what the compiler offers, which differs from the published capacity (libtpu 0.0.42.1 names it when it
# refuses a program too large for the chip: "... exceeds available HBM (15.75G)"; `compiler_hbm_budget` reads it).
@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_flops: float  # peak dense bf16 FLOP/s
  hbm_bytes: float  # published
  hbm_bandwidth: float  # bytes/s
  host_bandwidth: float  # bytes/s, host memory -> HBM, one way (PCIe): what an offloaded judge crosses
  usable_hbm_bytes: float | None = None  # the compiler's budget per chip (None: the published capacity)

  @property
  def budget_bytes(self) -> float:
    """What a step may hold per chip: every fit check compares against this."""
    return self.hbm_bytes if self.usable_hbm_bytes is None else self.usable_hbm_bytes

  def roofline_s(self, flops: float, bytes_accessed: float) -> float:
    return max(flops / self.bf16_flops, bytes_accessed / self.hbm_bandwidth)

  def host_transfer_s(self, nbytes: float) -> float:
    """Seconds to bring `nbytes` per chip from host memory to HBM, every chip over its own link at once."""
    return nbytes / self.host_bandwidth


CHIPS = {
    # Cloud TPU system architecture pages (per chip; v4 and v5p: one megacore device per chip). Host links: the JAX
    # team's "How to Scale Your Model" (part 2, "How to Think About TPUs"): PCIe 16 GB/s each way on v4, "around
    # 1.5e10 bytes/s per chip" on v5, 32 GB/s on Trillium (v6e).
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1200e9, 16e9, 30.75 * GiB),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9, 15e9, 15.75 * GiB),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, 15e9, 95.74 * GiB),
    "v6e": Chip("TPU v6e", 918e12, 32 * GiB, 1640e9, 32e9, 31.25 * GiB),
    # NVIDIA datasheets, SXM, dense (no sparsity); host link PCIe Gen5 x16, 128 GB/s both ways = 64 GB/s each.
    "h100": Chip("H100 SXM", 989e12, 80e9, 3.35e12, 64e9),
    "h200": Chip("H200 SXM", 989e12, 141e9, 4.8e12, 64e9),
}

# libtpu topology names: v4 / v5p count 2 cores per chip in the slice name (v5p-8 = 4 chips), v5e / v6e 1.
_TPU_KINDS = {"v4": ("v4", 2, 3), "v5p": ("v5", 2, 3), "v5e": ("v5e", 1, 2), "v6e": ("v6e", 1, 2)}
_GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8)}
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


class PlanError(ValueError):
  """A plan that cannot be made; the message names the flag or config field."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  devices: Sequence[Any]
  chip: Chip | None  # None: no published figures (the CPU backend)


def tpu_names() -> list[str]:
  return [f"{kind}-{cores * chips}" for kind, (_, cores, dims) in _TPU_KINDS.items()
          for chips in (_GRID_3D if dims == 3 else _GRID_2D)]


def topology(name: str | None) -> Topology:
  """`cpu` (or None): the local CPU devices; `gpu`: the local GPUs; `v5p-8` etc.: compile-only TPU devices."""
  if name in (None, "", "cpu"):
    return Topology("cpu", jax.devices("cpu"), None)
  if name == "gpu":
    try:
      devices = jax.devices("gpu")
    except RuntimeError as e:
      raise PlanError(f"--topology=gpu: no local GPU ({e})") from None
    kind = devices[0].device_kind.lower()
    chip = next((CHIPS[k] for k in ("h200", "h100") if k in kind), None)
    return Topology(f"gpu ({devices[0].device_kind})", devices, chip)
  kind, _, count = name.partition("-")
  if kind not in _TPU_KINDS or not count.isdigit():
    raise PlanError(f"--topology={name!r}: expected cpu, gpu or a TPU slice like v5p-8 ({', '.join(tpu_names())})")
  prefix, cores, dims = _TPU_KINDS[kind]
  chips, grids = int(count) // cores, (_GRID_3D if dims == 3 else _GRID_2D)
  if int(count) % cores or chips not in grids:
    raise PlanError(f"--topology={name!r}: not a known {kind} slice; known: "
                    f"{', '.join(n for n in tpu_names() if n.startswith(kind + '-'))}")
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise PlanError(f"--topology={name}: compiling for TPU without one needs libtpu ({LIBTPU_HINT})") from None
  from jax.experimental import topologies
  # Compile-only devices hold no chip: let several planning (or test) processes load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  grid = grids[chips]
  host = (2, 2, 1) if chips >= 4 else (1, 1, 1)
  wrap = (True,) * 3 if dims == 3 and chips >= 64 else (False,) * 3
  desc = topologies.get_topology_desc(
      topology_name=f"{prefix}:{'x'.join(map(str, grid))}", platform="tpu",
      chip_config_name="megacore" if cores == 2 else "default", chips_per_host_bounds=host, num_slices=1, wrap=wrap)
  return Topology(name, desc.devices, CHIPS[kind])


# --------------------------------------------------------------------------------------------------
# Counting
def shard_bytes(tree) -> int:
  """Per-device bytes of a pytree of abstract arrays with shardings (the largest shard of each leaf)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    dtype = leaf.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      data = jax.eval_shape(jax.random.key_data, leaf)
      shape, itemsize = tuple(leaf.shape) + tuple(data.shape[leaf.ndim:]), data.dtype.itemsize
      local = leaf.sharding.shard_shape(leaf.shape) + tuple(data.shape[leaf.ndim:])
    else:
      shape, itemsize = leaf.shape, np.dtype(dtype).itemsize
      local = leaf.sharding.shard_shape(shape) if leaf.sharding is not None else shape
    total += math.prod(local) * itemsize
  return total


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def matmul_flops(jaxpr, loops: bool = True, kernels: bool = True) -> float:
  """FLOPs of the dot_generals and convolutions of a jaxpr, nested jaxprs included; a `scan` counts its body
  `length` times with `loops`, once without (as XLA's cost analysis does); a `cond` its largest branch; a Pallas
  kernel (`pallas_call`: the splash attention) its body once per grid step with `kernels`, not at all without (XLA's
  cost analysis does not see into it). A kernel's skipped blocks (causal masks) are counted: an upper bound there."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "pallas_call":
      if kernels:
        total += matmul_flops(eqn.params["jaxpr"], loops) * math.prod(eqn.params["grid_mapping"].grid)
      continue
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      k = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      per_output = math.prod(rhs) / rhs[out_feature_dim]
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if not subs:
      continue
    counts = [matmul_flops(j, loops, kernels) for j in subs]
    if name == "cond":
      total += max(counts)
    else:
      total += sum(counts) * (eqn.params.get("length", 1) if name == "scan" and loops else 1)
  return total


@dataclasses.dataclass
class StepPlan:
  name: str
  calls: int  # calls per epoch (at most: every rollout kept)
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  xla_flops: float  # per chip, as XLA counts (loop bodies once)
  xla_bytes_accessed: float
  loop_factor: float
  compile_s: float
  kernel_flops: float = 0.0  # per chip: inside Pallas kernels, which XLA's cost analysis leaves out
  resident_extra_bytes: int = 0  # resident train state / frozen weights that are not arguments of this step
  # The compiler's refusal when the step cannot fit the chip at all (then temp_bytes is the temporaries it asked
  # for, FLOPs are unknown and counted as 0).
  refused: str = ""

  @property
  def flops(self) -> float:
    return self.xla_flops * self.loop_factor + self.kernel_flops

  @property
  def bytes_accessed(self) -> float:
    return self.xla_bytes_accessed * self.loop_factor

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def live_bytes(self) -> int:
    return self.peak_bytes + self.resident_extra_bytes


def compile_step(name: str, traced, args, *, calls: int = 1) -> tuple[StepPlan, Any]:
  """Lower and compile a traced step (`jitted.trace(*args)`, `args` abstract) -> (its plan, the compiled executable;
  None when a TPU compile refuses the step for lack of HBM: the plan then says so, with the bytes asked for).

  Arguments are counted from `args`' shards, not from the compiler's count, which leaves out inputs the program
  never reads (jit prunes them: e.g. Qwen-Image's last text-stream MLP, whose output nothing uses); they are in
  HBM all the same."""
  t0 = time.perf_counter()
  try:
    compiled = traced.lower().compile()
  except jax.errors.JaxRuntimeError as e:
    temp = refused_temp_bytes(str(e))
    if temp is None:
      raise
    return StepPlan(name, calls, shard_bytes(args), 0, 0, temp, 0, 0.0, 0.0, 1.0, time.perf_counter() - t0,
                    refused=str(e).strip().splitlines()[0]), None
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return StepPlan(name, calls, max(int(mem.argument_size_in_bytes), shard_bytes(args)), int(mem.output_size_in_bytes),
                  int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes), int(mem.generated_code_size_in_bytes),
                  float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                  _loop_factor(traced.jaxpr), compile_s, _kernel_flops(traced.jaxpr)), compiled


_REFUSAL = re.compile(r"RESOURCE_EXHAUSTED.*?HLO temporaries \(([0-9.]+)([KMGT]?)\) exceeds available HBM", re.S)


def _xla_bytes(m: re.Match) -> int:
  """A size as XLA prints it in a message ("19.28G": its G is GiB), from a match's (number, unit) groups."""
  return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def refused_temp_bytes(message: str) -> int | None:
  """The temporaries a TPU compile asked for when it refused for lack of HBM ("... the total memory required for
  HLO temporaries (19.28G) exceeds available HBM (15.75G)"), or None for any other error. XLA prints GiB as "G"."""
  m = _REFUSAL.search(message)
  if m is None:
    return None
  return _xla_bytes(m)


_AVAILABLE = re.compile(r"exceeds available HBM \(([0-9.]+)([KMGT]?)\)")


def compiler_hbm_budget(device) -> int | None:
  """The HBM per chip the TPU compiler lets a program use on `device` (a compile-only TPU device), read from its
  refusal of a program that needs more (sorting 2^31 values twice); None if it compiles or the message says
  otherwise. What `Chip.usable_hbm_bytes` records."""
  n = 2 ** 31 - 1024  # the most one sort takes
  x = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
  wide = lambda a, k: jnp.broadcast_to(a * k, (n // 8, 8)).reshape(-1)
  program = jax.jit(lambda a: jnp.sort(wide(a, 3.0))[::1024] + jnp.sort(wide(a, 5.0))[::1024])
  try:
    program.trace(x).lower().compile()
  except jax.errors.JaxRuntimeError as e:
    m = _AVAILABLE.search(str(e))
    return None if m is None else _xla_bytes(m)
  return None


def _log_compiled(log, plan: StepPlan) -> None:
  log(f"refused {plan.name} after {plan.compile_s:.1f}s: {plan.refused}" if plan.refused else
      f"compiled {plan.name} in {plan.compile_s:.1f}s")


def _loop_factor(jaxpr) -> float:
  if jaxpr is None:
    return 1.0
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  once = matmul_flops(jaxpr, loops=False, kernels=False)
  return matmul_flops(jaxpr, loops=True, kernels=False) / once if once else 1.0


def _kernel_flops(jaxpr) -> float:
  """The FLOPs inside Pallas kernels, loops counted (per chip: the kernels run under shard_map on a mesh)."""
  if jaxpr is None:
    return 0.0
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  return matmul_flops(jaxpr) - matmul_flops(jaxpr, kernels=False)


# --------------------------------------------------------------------------------------------------
# The abstract run
def _abstract(shape, dtype, mesh, spec=PartitionSpec()):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype) if not isinstance(dtype, jax.ShapeDtypeStruct) else
                              dtype.dtype, sharding=NamedSharding(mesh, spec))


def with_shardings(tree, shardings):
  """Abstract arrays (nnx Variables kept) carrying the shardings of `shardings` (a tree of NamedShardings where
  `tree` has Variables or arrays)."""

  def one(x, s):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      return x.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=s))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class _PlanFamily:
  """What `rollouts.Sampler` reads of a family, without its VAE and text encoders."""
  velocity: Any
  mesh: Any
  rules: tuple


@dataclasses.dataclass
class Plan:
  topology: Topology
  mesh_shape: dict
  steps: list[StepPlan]
  resident_bytes: int  # per chip: train state + frozen weights
  abstract: dict  # the abstract inputs of each step (for checks)
  judge_bytes: int = 0  # per chip: the MLLM judge's parameters
  judge: Any = None  # its `qwen2_5_vl.Qwen25VLConfig` (None: no MLLM reward)
  judge_offloaded: bool = False  # `config.reward.offload`: on the chips only during its own step
  encoder_bytes: dict = dataclasses.field(default_factory=dict)  # per chip, by name: VAE and text encoders, resident

  @property
  def judge_transfer_s(self) -> float:
    """Seconds an epoch spends bringing an offloaded judge to the chips: once, before its first scoring call (its
    host copy stays, so nothing goes back); 0 when it stays resident or the chip is unknown."""
    chip = self.topology.chip
    return chip.host_transfer_s(self.judge_bytes) if self.judge_offloaded and chip else 0.0

  @property
  def epoch_roofline_s(self) -> float:
    """Every step's roofline times its calls (every rollout kept), plus the judge's transfer; 0 without a chip."""
    chip = self.topology.chip
    if chip is None:
      return 0.0
    return self.judge_transfer_s + sum(chip.roofline_s(s.flops, s.bytes_accessed) * s.calls for s in self.steps)


# --------------------------------------------------------------------------------------------------
# The judge
def judge_parts(config, judge: str | None = None):
  """(`Qwen25VLConfig`, `processor.ImageProcessorConfig`) of the reward's judge, or None when
  `config.reward.kind` is not "mllm". No weights are read."""
  if config.reward.kind != "mllm":
    return None
  if judge not in (None, "") + JUDGES:
    raise PlanError(f"--judge={judge!r}: expected one of {list(JUDGES)}")
  dtype = config.reward.dtype
  runtime = dict(dtype=dtype, param_dtype=dtype, attention_impl=config.model.attention_impl)
  folder = config.reward.model_dir
  has_config = bool(folder) and paths.isfile(paths.join(folder, "config.json"))
  try:
    if judge == "tiny" or (not judge and not has_config and config.reward.tiny):
      cfg = tiny_lib.tiny_judge_config(**runtime)
      folder = os.path.join(tiny_lib.ASSETS, "judge")  # the tiny judge's preprocessor_config.json
    elif judge in ("7b", "32b"):
      cfg = (qwen2_5_vl.qwen2_5_vl_7b if judge == "7b" else qwen2_5_vl.qwen2_5_vl_32b)(**runtime)
    elif has_config:
      path = paths.join(folder, "config.json")
      cfg = qwen2_5_vl.Qwen25VLConfig.from_hf_config(wio.read_config(folder), source=path, **runtime)
    else:
      cfg = qwen2_5_vl.qwen2_5_vl_32b(**runtime)
    if folder and paths.isfile(paths.join(folder, "preprocessor_config.json")):
      image_cfg = proc.ImageProcessorConfig.from_folder(folder)
    else:
      image_cfg = proc.ImageProcessorConfig(*proc.DEFAULT_PIXELS)
  except (ValueError, wio.CheckpointError) as e:
    raise PlanError(f"the judge (config.reward.model_dir = {config.reward.model_dir!r}): {e}") from None
  return cfg, image_cfg


def abstract_module(make, mesh, rules):
  """(graphdef, abstract state carrying the shardings its weights get) of the module `make()` builds."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  return graphdef, with_shardings(state, shd.state_shardings(state, mesh, rules))


def abstract_judge(cfg, mesh, rules):
  """`abstract_module` of a Qwen2.5-VL judge."""
  return abstract_module(lambda: qwen2_5_vl.Qwen25VL(cfg, rngs=nnx.Rngs(0)), mesh, rules)


def judge_batch(cfg, image_cfg, rows: int, resolution: int, mesh, rules, *, text_tokens: int = JUDGE_TEXT_TOKENS,
                length_multiple: int = 64):
  """(abstract `qwen2_5_vl.Batch`, abstract positions (rows, 1)) of one scoring call as `MllmJudge` places it:
  `rows` pairs of two `resolution`-squared images, left-padded to a multiple of `length_multiple`."""
  h, w = image_cfg.resized(resolution, resolution)
  image_tokens = image_cfg.num_tokens((1, h // image_cfg.patch_size, w // image_cfg.patch_size))
  text = max(text_tokens, 4)  # the vision start / end markers are part of it
  length = -(-(text + 2 * image_tokens) // length_multiple) * length_multiple
  try:
    batch = qwen2_5_vl.abstract_batch(cfg, image_cfg, rows, (h, w), 2, text, length, mesh, rules, left_pad=True)
  except ValueError as e:
    raise PlanError(str(e)) from None
  return batch, shd.abstract_rows((rows, 1), "int32", mesh, rules)


def plan_epoch(config, topo: Topology, *, layers: tuple[int, int] | None = None, steps: Sequence[str] = STEPS,
               judge: str | None = None, log=None) -> Plan:
  """Compile one epoch's device steps of `config` for `topo`; nothing is allocated or read. `judge`: the MLLM
  judge's size (see `judge_parts`)."""
  judge_spec = judge_parts(config, judge)
  family_name = config.model.family
  family_cls = families.FAMILIES.get(family_name)
  if family_cls is None:
    raise PlanError(f"config.model.family = {family_name!r}: expected one of {sorted(families.FAMILIES)}")
  try:
    make_transformer, condition, grid, channels = family_cls.abstract_parts(config, layers)
  except ValueError as e:
    raise PlanError(str(e)) from None
  rules = train_loop.mesh_rules(config)
  try:
    mesh = shd.make_mesh(tuple(config.mesh.shape), devices=topo.devices)
  except ValueError as e:
    raise PlanError(f"config.mesh.shape on --topology={topo.name}: {e}") from None
  rows_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
  log = log or (lambda _: None)

  built = {}

  def build():
    trainer, params, frozen = train_loop.build_nft_trainer(config, family_cls, make_transformer(), mesh, rules)
    built["trainer"] = trainer
    return params, frozen

  t0 = time.perf_counter()
  params, frozen = jax.eval_shape(build)
  trainer: nft.NFTTrainer = built["trainer"]
  log(f"built the models abstractly in {time.perf_counter() - t0:.1f}s")
  params = with_shardings(params, trainer.shardings["params"])
  frozen = with_shardings(frozen, trainer.shardings["frozen"])
  state = with_shardings(jax.eval_shape(trainer.init, params), trainer.shardings["state"])
  resident = shard_bytes(state) + shard_bytes(frozen)
  judge_bytes = 0
  if judge_spec is not None:
    judge_graphdef, judge_state = abstract_judge(judge_spec[0], mesh, rules)
    judge_bytes = shard_bytes(judge_state)
    log(f"judge: {judge_bytes / GiB:.2f} GiB of parameters per chip")
  modules = {name: abstract_module(make, mesh, rules) for name, make in family_cls.abstract_encoders(config).items()}
  encoders = {name: shard_bytes(state) for name, (_, state) in modules.items()}
  log("VAE and text encoders: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in encoders.items()) + " per chip")
  # what the policy's steps share the chips with: the judge unless offloaded, the encoders always
  beside = (0 if config.reward.offload else judge_bytes) + sum(encoders.values())

  n_rollouts = config.data.groups_per_epoch * config.data.group_size
  chunk = config.rollout.batch_size * rows_multiple
  micro = config.nft.micro_batch * rows_multiple
  num_steps = config.rollout.num_steps
  tokens = grid[0] * grid[1]
  key = jax.eval_shape(lambda: jax.random.key(0))
  out: list[StepPlan] = []
  abstract = {}

  def record(step, name, traced, args, calls, extra):  # compile one step; `extra`: resident bytes beside its args
    plan, _ = compile_step(name, traced, args, calls=calls)
    plan.resident_extra_bytes = extra
    abstract[step] = args
    out.append(plan)
    _log_compiled(log, plan)

  def codec_step(step, name, fn, args, calls, own):  # a step of the VAE or text encoders (`own`: their bytes)
    record(step, name, fn.trace(*args), args, calls, resident + beside - own)

  distinct = math.ceil(config.data.groups_per_epoch / chunk)  # one encoding per distinct record and instruction
  if "text" in steps:
    try:
      fn, args = family_cls.abstract_text_step(config, modules, chunk, mesh, rules)
    except ValueError as e:
      raise PlanError(str(e)) from None
    codec_step("text", "text encoding", fn, args, distinct, sum(v for k, v in encoders.items() if k != "VAE"))
  vae_def, vae_state = modules["VAE"]
  if "encode" in steps:
    fn = jax.jit(lambda vae, images: latents.reference_latents(nnx.merge(vae_def, vae), images)[0])
    images = shd.abstract_rows((chunk, config.data.resolution, config.data.resolution, 3), "float32", mesh, rules)
    codec_step("encode", "encode (VAE)", fn, (vae_state, images), distinct, encoders["VAE"])

  x0_dtype = jnp.float32
  if "rollout" in steps:
    sampler = rollouts.Sampler(_PlanFamily(family_cls.velocity, mesh, rules),
                               lambda states: trainer.policy.model(*states), noise_level=config.rollout.sde_noise)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), chunk))
    args = ((state.old_params, frozen), condition(chunk, mesh, rules),
            shd.abstract_rows((chunk, tokens, channels), "float32", mesh, rules),
            _abstract((num_steps + 1,), "float32", mesh),
            jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=NamedSharding(
                mesh, shd.logical_to_spec(("batch",), rules, keys.shape, mesh))))
    traced = sampler.trace(*args, solver=config.rollout.sampler)
    record("rollout", "rollout (one chunk)", traced, args, math.ceil(n_rollouts / chunk),
           resident - shard_bytes(state.old_params) - shard_bytes(frozen) + beside)
    x0_dtype = jax.tree.leaves(traced.out_info)[0].dtype

  if "decode" in steps:
    fn = jax.jit(lambda vae, x: latents.decode_tokens(nnx.merge(vae_def, vae), x, 2 * grid[0], 2 * grid[1]))
    codec_step("decode", "decode (VAE)", fn,
               (vae_state, shd.abstract_rows((chunk, tokens, channels), x0_dtype, mesh, rules)),
               math.ceil(n_rollouts / chunk), encoders["VAE"])

  if "judge" in steps and judge_spec is not None:
    cfg, image_cfg = judge_spec
    width = math.prod(mesh.shape[a] for a in mllm._mesh_axes(rules, "batch"))
    rows = -(-config.reward.batch_size // width) * width
    judge_batch_, positions = judge_batch(cfg, image_cfg, rows, config.data.resolution, mesh, rules)
    digit_ids = np.arange(len(mllm.DIGITS), dtype=np.int32)  # which ids does not change the step's cost
    fn = jax.jit(functools.partial(mllm.score_step, judge_graphdef, digit_ids, mesh, rules))
    args = (judge_state, judge_batch_, positions)
    record("judge", "judge prefill", fn.trace(*args), args, math.ceil(n_rollouts / config.reward.batch_size),
           resident + sum(encoders.values()))

  rows = functools.partial(shd.abstract_rows, mesh=mesh, rules=rules)
  batch = nft.TrainBatch(x0=rows((micro, tokens, channels), x0_dtype), cond=condition(micro, mesh, rules),
                         sigmas=rows((micro, num_steps), "float32"), advantages=rows((micro,), "float32"),
                         mask=rows((micro,), "float32"), index=rows((micro,), "int32"))
  batch = with_shardings(batch, trainer.shardings["batch"])
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=trainer.shardings["key"])
  todo = dict(accumulate=("accumulate (one micro-batch)", trainer.accumulate, (state, frozen, batch, key),
                          math.ceil(n_rollouts / micro), resident - shard_bytes(state) - shard_bytes(frozen)),
              apply=("apply", trainer.apply, (state,), 1, shard_bytes(frozen)),
              update_old=("update_old", trainer.update_old, (state,), 1, shard_bytes(frozen)))
  todo = {k: v[:4] + (v[4] + beside,) for k, v in todo.items()}
  for step in ("accumulate", "apply", "update_old"):
    if step not in steps:
      continue
    name, fn, args, calls, extra = todo[step]
    record(step, name, fn.trace(*args), args, calls, extra)
  return Plan(topo, dict(mesh.shape), out, resident, abstract, judge_bytes, judge_spec and judge_spec[0],
              bool(config.reward.offload), encoders)


# --------------------------------------------------------------------------------------------------
# The table
def format_bytes(b: float) -> str:
  sign, b = ("-" if b < 0 else ""), abs(b)
  for unit, scale in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if b >= scale:
      return f"{sign}{b / scale:.2f} {unit}"
  return f"{sign}{b:.0f} B"


def _flops(f: float) -> str:
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
    if f >= scale:
      return f"{f / scale:.2f}{unit}"
  return f"{f:.0f}"


def _time(s: float) -> str:
  if s < 1e-3:
    return f"{s * 1e6:.1f}us"
  return f"{s * 1e3:.2f}ms" if s < 1 else f"{s:.2f}s"


# --------------------------------------------------------------------------------------------------
# What to change when a step does not fit
# The knob that sets each row-batched step's rows per data-parallel shard.
ROW_KNOBS = {"rollout": "rollout.batch_size", "judge": "reward.batch_size", "accumulate": "nft.micro_batch"}
_STEP_OF = {"text encoding": "text", "encode (VAE)": "encode", "rollout (one chunk)": "rollout",
            "decode (VAE)": "decode", "judge prefill": "judge", "accumulate (one micro-batch)": "accumulate",
            "apply": "apply", "update_old": "update_old"}


@dataclasses.dataclass
class Fit:
  """The largest value of a step's row knob whose step fits the chip, found by compiling (`largest_rows`)."""
  step: str
  knob: str  # the config field
  configured: int
  largest: int  # 0: not even one row fits
  live_bytes: int  # of the step at `largest` (or at 1 row when nothing fits)
  compiles: int

  def __str__(self) -> str:
    return (f"{self.knob}: configured {self.configured}, largest that fits {self.largest} "
            f"({format_bytes(self.live_bytes)} live per chip; {self.compiles} compiles)")


def _with(config, field: str, value):
  config = config.copy_and_resolve_references()
  section, name = field.split(".")
  with config.unlocked():
    config[section][name] = value
  return config


def largest_rows(config, topo: Topology, step: str, *, layers=None, judge: str | None = None, max_compiles: int = 6,
                 log=None) -> Fit:
  """The largest rows per data-parallel shard (`ROW_KNOBS[step]`) whose `step` fits the chip's HBM: doubling from
  the configured value while it fits (then bisecting), or halving while it does not; at most `max_compiles`
  compiles (each a full compile of that one step)."""
  if topo.chip is None:
    raise PlanError(f"--topology={topo.name}: no chip figures, nothing to fit against")
  knob = ROW_KNOBS[step]
  section, name = knob.split(".")
  configured = int(config[section][name])
  live: dict[int, int] = {}

  def fits(rows: int) -> bool:
    if rows not in live:
      plan = plan_epoch(_with(config, knob, rows), topo, layers=layers, steps=(step,), judge=judge)
      live[rows] = plan.steps[0].live_bytes
      if log:
        log(f"{knob} = {rows}: {format_bytes(live[rows])} live per chip")
    return live[rows] <= topo.chip.budget_bytes

  good, bad = 0, None
  rows = configured
  while len(live) < max_compiles:
    if fits(rows):
      good = rows
      if bad is None:
        rows *= 2
        continue
    else:
      bad = rows
      if good == 0 and rows > 1:
        rows //= 2
        continue
    if bad is None or bad - good <= 1:
      break
    rows = (good + bad) // 2
  return Fit(step, knob, configured, good, live[good] if good else live[min(live)], len(live))


def fit_rows(plan: Plan, config, **kw) -> list[Fit]:
  """`largest_rows` for each row-batched step of `plan`."""
  return [largest_rows(config, plan.topology, _STEP_OF[s.name], **kw) for s in plan.steps
          if _STEP_OF[s.name] in ROW_KNOBS]


def advice(plan: Plan, config) -> list[str]:
  """What to change for each step that does not fit, from the plan alone (no compiles): the judge off the chips
  between its steps, the blocks in a scan, full remat for the NFT step; `largest_rows` for the rows that fit."""
  chip = plan.topology.chip
  if chip is None:
    return []
  lines = []
  for s in plan.steps:
    over = s.live_bytes - chip.budget_bytes
    if over <= 0:
      continue
    step = _STEP_OF[s.name]
    tips = []
    if plan.judge_bytes and not plan.judge_offloaded and step != "judge":
      freed = plan.judge_bytes
      tips.append(f"--config.reward.offload=True frees {format_bytes(freed)} per chip (the judge waits in host memory "
                  f"and crosses the host link once an epoch, {_time(chip.host_transfer_s(freed))}; "
                  f"{'enough' if freed >= over else 'not enough alone'})")
    if step in ("rollout", "accumulate") and not config.model.scan_blocks:
      tips.append("--config.model.scan_blocks=True runs the blocks in a scan: FSDP gathers one block's weights at a "
                  "time instead of holding many gathered")
    if step == "accumulate" and config.model.remat != "full":
      tips.append(f"--config.model.remat=full (now {config.model.remat!r}) recomputes every block's activations in "
                  "the backward pass")
    if step in ROW_KNOBS:
      tips.append(f"fewer rows per shard ({ROW_KNOBS[step]}; launch/plan.py --fit searches the largest that fits)")
    elif step in ("text", "encode", "decode"):
      tips.append("fewer rows per shard (rollout.batch_size: these steps run on a rollout chunk)")
    lines.append(f"{s.name} is over by {format_bytes(over)}: " + "; ".join(tips or ["more chips (a larger slice)"]))
  return lines


def format_plan(plan: Plan) -> str:
  chip = plan.topology.chip
  mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh_shape.items())
  lines = [f"topology {plan.topology.name}: {len(plan.topology.devices)} devices, "
           f"chip {chip.name if chip else 'none (no published figures: no roofline, no HBM check)'}; mesh {mesh}",
           f"resident per chip (train state + frozen weights): {format_bytes(plan.resident_bytes)}"]
  if plan.judge is not None:
    j = plan.judge
    where = "resident through the epoch"
    if plan.judge_offloaded:
      where = "in host memory except during its step (config.reward.offload)"
      if chip:
        where += (f"; brought to the chips once an epoch: {_time(plan.judge_transfer_s)} at "
                  f"{chip.host_bandwidth / 1e9:.0f} GB/s per chip from the host, counted in the epoch roofline")
    lines.append(f"judge (Qwen2.5-VL, {j.num_hidden_layers} layers x {j.hidden_size}, vision {j.vision.depth} x "
                 f"{j.vision.hidden_size}, {j.param_dtype}): {format_bytes(plan.judge_bytes)} per chip, {where}")
  if plan.encoder_bytes:
    lines.append("resident VAE and text encoders per chip: " +
                 ", ".join(f"{k} {format_bytes(v)}" for k, v in plan.encoder_bytes.items()))
  head = ("step", "calls", "arguments", "outputs", "aliased", "temporaries", "peak", "live", "FLOPs/chip",
          "loop x", "roofline", "x calls", "HBM", "compile")
  rows = []
  for s in plan.steps:
    if chip:
      t = chip.roofline_s(s.flops, s.bytes_accessed)
      margin = chip.budget_bytes - s.live_bytes
      fit = f"fits ({format_bytes(margin)} free)" if margin >= 0 else f"DOES NOT FIT (over by {format_bytes(-margin)})"
      roof, total = _time(t), _time(t * s.calls)
    else:
      roof = total = fit = "n/a"
    if s.refused:  # the compiler stopped before a cost analysis: bytes are a lower bound, FLOPs unknown
      roof = total = "-"
      over = format_bytes(s.live_bytes - chip.budget_bytes)
      fit = f"DOES NOT FIT (refused by the compiler; over by at least {over})"
    rows.append((s.name, str(s.calls), format_bytes(s.argument_bytes), format_bytes(s.output_bytes), format_bytes(s.alias_bytes),
                 format_bytes(s.temp_bytes), format_bytes(s.peak_bytes), format_bytes(s.live_bytes),
                 "-" if s.refused else _flops(s.flops), f"{s.loop_factor:.1f}", roof, total, fit, f"{s.compile_s:.1f}s"))
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
  fmt = lambda r: "  ".join(c.ljust(w) if i in (0, 12) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
  lines += [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
  if chip:
    hbm = chip.budget_bytes
    worst = max(plan.steps, key=lambda s: s.live_bytes)
    verdict = "fits" if worst.live_bytes <= hbm else "DOES NOT FIT"
    lines.append(f"largest: {worst.name}, {format_bytes(worst.live_bytes)} of {format_bytes(hbm)} usable HBM per chip: "
                 f"{verdict} (margin {format_bytes(hbm - worst.live_bytes)}); epoch roofline (every rollout kept) "
                 f"{_time(plan.epoch_roofline_s)}")
  lines.append("peak = arguments + outputs - aliased + temporaries + code; live = peak + resident state (judge "
               "included unless offloaded, VAE and text encoders always) that is not an argument; FLOPs and bytes x "
               "loop factor (XLA counts a loop body once)")
  if plan.judge is not None and any(s.name == "judge prefill" for s in plan.steps):
    lines.append(f"the judge prefill row is one full scoring call, {JUDGE_TEXT_TOKENS} text tokens per pair assumed "
                 "besides the image pads")
  return "\n".join(lines)
