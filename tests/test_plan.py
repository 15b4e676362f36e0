"""launch/plan.py and editr1_jax.plan: one epoch's device steps compiled abstractly, per-chip numbers."""

import dataclasses
import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny as tiny_config
from editr1_jax import plan as planning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_NAMES = ["text encoding", "encode (VAE)", "rollout (one chunk)", "decode (VAE)", "judge prefill",
              "accumulate (one micro-batch)", "apply", "update_old"]


@pytest.fixture(scope="module", params=["tiny", "tiny_qwen_image_edit"])
def tiny_plan(request):
  """The tiny config of each family, planned on the CPU devices."""
  config = importlib.import_module(f"configs.{request.param}").get_config()
  return config, planning.plan_epoch(config, planning.topology("cpu"))


def _concrete_shard_bytes(abstract) -> int:
  """Bytes of device 0's shard of every input, from real arrays placed with the same shardings."""
  total = 0
  for leaf in jax.tree.leaves(abstract):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      keys = jax.random.split(jax.random.key(0), int(np.prod(leaf.shape))).reshape(leaf.shape)
      x = jax.device_put(keys, leaf.sharding)
      total += jax.random.key_data(x.addressable_shards[0].data).nbytes
    else:
      x = jax.device_put(np.zeros(leaf.shape, leaf.dtype), leaf.sharding)
      total += x.addressable_shards[0].data.nbytes
  return total


def test_tiny_plan_on_cpu(tiny_plan):
  config, plan = tiny_plan
  assert [s.name for s in plan.steps] == STEP_NAMES
  assert plan.topology.chip is None and len(plan.topology.devices) == jax.device_count("cpu")
  for s in plan.steps:
    assert s.argument_bytes > 0 and s.output_bytes > 0 and s.peak_bytes > 0, s
    assert s.flops > 0 and s.compile_s > 0, s
  steps = {s.name.split()[0]: s for s in plan.steps}
  # The NFT accumulate's argument bytes are the inputs' shards (state, frozen, batch, key) on one device.
  acc = steps["accumulate"]
  assert acc.argument_bytes == _concrete_shard_bytes(plan.abstract["accumulate"])
  assert acc.argument_bytes == planning.shard_bytes(plan.abstract["accumulate"])
  # The train state is donated: accumulate's state output aliases its input.
  state_bytes = planning.shard_bytes(plan.abstract["accumulate"][0])
  assert acc.alias_bytes == state_bytes
  # Loop factors: T = int(0.99 N) NFT terms per micro-batch; the sampler calls the network N times; each call runs
  # its scanned blocks (2 per stack in both tiny presets), which XLA counts once: a call's matmuls are E + sum 2 B_k
  # against E + sum B_k counted, a ratio in (1, 2].
  terms, calls = int(config.rollout.num_steps * config.nft.timestep_fraction), config.rollout.num_steps
  assert terms < acc.loop_factor <= 2 * terms
  assert calls < steps["rollout"].loop_factor <= 2 * calls
  assert steps["apply"].loop_factor == 1.0
  text = planning.format_plan(plan)
  for name in STEP_NAMES:
    assert sum(line.startswith(name) for line in text.splitlines()) == 1, text
  assert "n/a" in text  # no chip figures on the CPU backend


def test_matmul_flops_count_scanned_blocks_at_their_length():
  """FLOPs of stacked blocks (one scan) equal those of the same blocks kept apart; without loops, one block."""
  from flax import nnx

  from editr1_jax.models import flux
  from flux_fixtures import EXACT, TINY, make_inputs
  inputs = make_inputs(**EXACT)

  def count(cfg, loops=True):
    model = nnx.eval_shape(lambda: flux.FluxTransformer(cfg, rngs=nnx.Rngs(0)))
    return planning.matmul_flops(jax.make_jaxpr(lambda m: m(**inputs))(model).jaxpr, loops)

  scanned = flux.FluxConfig.from_diffusers_config(dict(TINY, num_layers=3))
  assert count(scanned) == count(scanned.replace(scan_blocks=False)) > 0
  assert count(scanned, loops=False) == count(scanned.replace(num_layers=1, num_single_layers=1))


def _param_shard_bytes(state) -> int:
  """Device 0's bytes of an abstract nnx state, from each leaf's shard shape."""
  from flax import nnx
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  values = [v.get_value() if isinstance(v, nnx.Variable) else v for v in leaves]
  return sum(int(np.prod(v.sharding.shard_shape(v.shape))) * np.dtype(v.dtype).itemsize for v in values)


def test_resident_encoders_are_the_familys(tiny_plan):
  """The VAE and text encoders the plan counts as resident are, byte for byte, those the family itself builds and
  places on the same mesh."""
  from flax import nnx

  from editr1_jax import families
  config, plan = tiny_plan
  mesh = planning.shd.make_mesh(tuple(config.mesh.shape), devices=plan.topology.devices)
  family = families.build(config, mesh, planning.train_loop.mesh_rules(config))
  text = family.text.model if hasattr(family.text, "model") else (family.text.clip, family.text.t5)
  placed = jax.tree.leaves((nnx.state(family.vae), nnx.state(text)))
  assert sum(x.addressable_shards[0].data.nbytes for x in placed) == sum(plan.encoder_bytes.values()) > 0
  assert "resident VAE and text encoders per chip: VAE" in planning.format_plan(plan)


def test_encoder_and_vae_steps(tiny_plan):
  """Prompt encoding, VAE encode and decode are planned on the rollout's chunk of rows; their own networks are their
  arguments, everything else resident counts beside them."""
  config, plan = tiny_plan
  steps = {s.name: s for s in plan.steps}
  chunk = config.rollout.batch_size * len(plan.topology.devices)
  distinct = -(-config.data.groups_per_epoch // chunk)
  (_, images), (_, tokens) = plan.abstract["encode"], plan.abstract["decode"]
  assert images.shape == (chunk, config.data.resolution, config.data.resolution, 3)
  assert tokens.shape[0] == chunk == plan.abstract["text"][-1].shape[0]
  assert (steps["text encoding"].calls, steps["encode (VAE)"].calls) == (distinct, distinct)
  assert steps["decode (VAE)"].calls == -(-config.data.groups_per_epoch * config.data.group_size // chunk)
  everything = plan.resident_bytes + plan.judge_bytes + sum(plan.encoder_bytes.values())
  vae = plan.encoder_bytes["VAE"]
  assert steps["encode (VAE)"].resident_extra_bytes == steps["decode (VAE)"].resident_extra_bytes == everything - vae
  assert steps["text encoding"].resident_extra_bytes == plan.resident_bytes + plan.judge_bytes + vae
  for name in ("text encoding", "encode (VAE)", "decode (VAE)"):
    assert steps[name].flops > 0 and steps[name].argument_bytes > 0, name


def test_judge_prefill_row(tiny_plan):
  """The MLLM judge's scoring call is planned: the tiny judge's parameters are its arguments and stay resident
  (in every other step's live bytes); the batch is reward.batch_size pairs of two training-resolution images."""
  from editr1_jax.reward import processor as proc
  config, plan = tiny_plan
  steps = {s.name: s for s in plan.steps}
  judge = steps["judge prefill"]
  assert judge.argument_bytes > 0 and judge.output_bytes > 0 and judge.temp_bytes > 0 and judge.flops > 0
  state, batch, positions = plan.abstract["judge"]
  params = _param_shard_bytes(state)
  assert params > 0 and plan.judge_bytes == params
  assert judge.argument_bytes >= params
  assert judge.argument_bytes == planning.shard_bytes(plan.abstract["judge"])  # CPU: no layout padding
  assert judge.calls == -(-config.data.groups_per_epoch * config.data.group_size // config.reward.batch_size)
  encoders = sum(plan.encoder_bytes.values())
  assert judge.resident_extra_bytes == plan.resident_bytes + encoders  # the train state and encoders meanwhile
  for name in ("rollout (one chunk)", "accumulate (one micro-batch)", "apply", "update_old"):
    assert steps[name].resident_extra_bytes >= params, name
  assert steps["apply"].resident_extra_bytes == params + planning.shard_bytes(plan.abstract["accumulate"][1]) + encoders
  # Two images per pair at the training resolution, resized as the tiny judge's processor does.
  width = len(jax.devices("cpu"))
  rows = -(-config.reward.batch_size // width) * width
  image_cfg = proc.ImageProcessorConfig.from_folder(os.path.join(ROOT, "editr1_jax", "assets", "tiny", "judge"))
  h, w = proc.smart_resize(config.data.resolution, config.data.resolution, 28, image_cfg.min_pixels,
                           image_cfg.max_pixels)
  patches = (h // 14) * (w // 14)
  assert batch.pixel_values.shape == (2 * rows * patches, 1176)
  assert batch.input_ids.shape[0] == rows and positions.shape == (rows, 1)
  assert batch.input_ids.shape[1] % 64 == 0 and batch.input_ids.shape[1] >= planning.JUDGE_TEXT_TOKENS + patches // 2
  assert "judge (Qwen2.5-VL" in planning.format_plan(plan)


def test_an_offloaded_judge_leaves_the_other_steps(tiny_plan):
  """`config.reward.offload`: the judge's parameters count in its own step only."""
  config, resident = tiny_plan
  config = config.copy_and_resolve_references()
  config.reward.offload = True
  plan = planning.plan_epoch(config, planning.topology("cpu"), steps=("judge", "apply"))
  before = {s.name: s for s in resident.steps}
  after = {s.name: s for s in plan.steps}
  assert after["apply"].resident_extra_bytes == before["apply"].resident_extra_bytes - resident.judge_bytes
  assert after["judge prefill"].argument_bytes == before["judge prefill"].argument_bytes
  assert "in host memory except during its step" in planning.format_plan(plan)
  # On a chip, the epoch pays for bringing the judge over the host link once (its host copy stays).
  cpu = planning.topology("cpu")
  chip = planning.Chip("link", 1e12, 2 ** 40, 1e11, host_bandwidth=1e9)
  on_chip = planning.plan_epoch(config, planning.Topology("cpu", cpu.devices, chip), steps=("judge", "apply"))
  assert on_chip.judge_transfer_s == pytest.approx(resident.judge_bytes / 1e9) and on_chip.judge_transfer_s > 0
  steps_s = sum(chip.roofline_s(s.flops, s.bytes_accessed) * s.calls for s in on_chip.steps)
  assert on_chip.epoch_roofline_s == pytest.approx(steps_s + resident.judge_bytes / 1e9)
  assert "brought to the chips once an epoch" in planning.format_plan(on_chip)
  kept = dataclasses.replace(on_chip, judge_offloaded=False)
  assert kept.judge_transfer_s == 0 and kept.epoch_roofline_s == pytest.approx(steps_s)


def test_judge_parts(tmp_path):
  import json
  from editr1_jax.models import qwen2_5_vl
  from editr1_jax.reward import processor as proc
  config = tiny_config.get_config()
  cfg, image_cfg = planning.judge_parts(config)
  assert cfg.num_hidden_layers == qwen2_5_vl.tiny().num_hidden_layers and image_cfg.max_pixels == 28 * 28 * 16
  big, default_pixels = planning.judge_parts(config, "7b")
  assert big.hidden_size == qwen2_5_vl.qwen2_5_vl_7b().hidden_size
  assert (default_pixels.min_pixels, default_pixels.max_pixels) == proc.DEFAULT_PIXELS
  config.reward.tiny = False
  assert planning.judge_parts(config)[0].hidden_size == qwen2_5_vl.qwen2_5_vl_32b().hidden_size
  # A model folder's config.json gives the sizes (no weights there: none are read).
  (tmp_path / "config.json").write_text(json.dumps({
      "vocab_size": 160, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
      "num_attention_heads": 4, "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
      "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "window_size": 56,
                        "out_hidden_size": 64, "fullatt_block_indexes": [0]}}))
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 50176}))
  config.reward.model_dir = str(tmp_path)
  cfg, image_cfg = planning.judge_parts(config)
  assert (cfg.num_hidden_layers, cfg.vision.depth, cfg.param_dtype) == (3, 1, config.reward.dtype)
  assert image_cfg.max_pixels == 50176
  with pytest.raises(planning.PlanError, match="--judge='13b'"):
    planning.judge_parts(config, "13b")
  config.reward.kind = "colour"
  assert planning.judge_parts(config) is None


def test_abstract_condition_matches_the_family(tiny_plan):
  """The plan's abstract condition rows have the shapes and dtypes of the tiny family's real ones."""
  from editr1_jax import families, sharding as shd, train_loop
  config, plan = tiny_plan
  abstract = plan.abstract["accumulate"][2].cond
  rows = abstract.reference.shape[0]
  mesh = shd.make_mesh(tuple(config.mesh.shape))
  family = families.build(config, mesh, train_loop.mesh_rules(config))
  res = config.data.resolution
  sources = np.zeros((rows, res, res, 3), np.float32)
  real = family.condition(sources, ["make it red"] * rows, grid=family.grid(res, res), guidance=config.rollout.guidance)
  got = [(a.shape, jnp.dtype(a.dtype)) for a in jax.tree.leaves(abstract)]
  want = [(tuple(np.shape(x)), jnp.dtype(x.dtype)) for x in jax.tree.leaves(real)]
  assert got == want


def test_matmul_flops_counts_scans():
  def f(x):
    return jax.lax.scan(lambda c, _: (c @ x, None), x, None, length=5)[0] @ x

  jaxpr = jax.make_jaxpr(f)(jnp.ones((8, 8))).jaxpr
  one = 2 * 8 * 8 * 8
  assert planning.matmul_flops(jaxpr) == 6 * one
  assert planning.matmul_flops(jaxpr, loops=False) == 2 * one


def test_chip_table_and_roofline():
  assert set(planning.CHIPS) >= {"v4", "v5e", "v5p", "v6e", "h100", "h200"}
  v5p = planning.CHIPS["v5p"]
  assert v5p.roofline_s(v5p.bf16_flops, 0) == pytest.approx(1.0)
  assert v5p.roofline_s(0, 2 * v5p.hbm_bandwidth) == pytest.approx(2.0)
  assert v5p.host_transfer_s(3 * v5p.host_bandwidth) == pytest.approx(3.0)
  assert all(c.host_bandwidth < c.hbm_bandwidth / 10 for c in planning.CHIPS.values())  # a host link, not HBM


def test_topology_errors(monkeypatch):
  with pytest.raises(planning.PlanError, match="--topology='v9x-8'"):
    planning.topology("v9x-8")
  with pytest.raises(planning.PlanError, match="--topology='v5p-6'.*v5p-8"):
    planning.topology("v5p-6")
  monkeypatch.setitem(sys.modules, "libtpu", None)  # as if libtpu were not installed
  with pytest.raises(planning.PlanError, match=r"--topology=v5p-8.*pip install libtpu==0\.0\.42\.1"):
    planning.topology("v5p-8")


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_prints_a_row_per_step():
  out = _run_cli(f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", "--steps=apply,update_old",
                 "--config.lora.rank=2")
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert any(l.startswith("apply ") for l in lines) and any(l.startswith("update_old ") for l in lines), out.stdout
  bad = _run_cli(f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", "--topology=v5p-7")
  assert bad.returncode == 2 and "--topology='v5p-7'" in bad.stderr, bad.stderr[-3000:]


def _has_libtpu() -> bool:
  try:
    import libtpu  # noqa: F401
    return True
  except ImportError:
    return False


@pytest.mark.skipif(not _has_libtpu(), reason="libtpu is not installed (pip install libtpu==0.0.42.1): no "
                    "compile-only TPU devices")
def test_tiny_plan_on_v5p_8():
  config = tiny_config.get_config()
  topo = planning.topology("v5p-8")
  assert len(topo.devices) == 4 and topo.chip is planning.CHIPS["v5p"]
  plan = planning.plan_epoch(config, topo, steps=("accumulate",))
  (acc,) = plan.steps
  # TPU layouts pad small dimensions to tiles: at least the logical shards, never less.
  assert acc.argument_bytes >= planning.shard_bytes(plan.abstract["accumulate"])
  assert acc.flops > 0 and acc.temp_bytes > 0
  text = planning.format_plan(plan)
  assert "TPU v5p" in text and "fits" in text and "roofline" in text
  # the budget the plan checks against is the compiler's (printed to 0.01 GiB), not the published capacity
  for kind, name in (("v5p", "v5p-8"), ("v5e", "v5e-16")):
    budget = planning.compiler_hbm_budget(planning.topology(name).devices[0])
    assert budget is not None and abs(budget - planning.CHIPS[kind].usable_hbm_bytes) <= 0.01 * 2 ** 30, kind


def test_largest_rows_that_fit_are_found_by_compiling():
  """A chip whose HBM lies between the NFT step's live bytes at 2 and 3 rows per shard: the search, started from the
  configured 4, lands on 2; the advice names the knobs."""
  config = tiny_config.get_config()
  cpu = planning.topology("cpu")
  live = {m: planning.plan_epoch(planning._with(config, "nft.micro_batch", m), cpu,
                                 steps=("accumulate",)).steps[0].live_bytes for m in (2, 3)}
  assert live[2] < live[3]
  small = planning.Topology("cpu", cpu.devices, planning.Chip("small", 1e12, (live[2] + live[3]) // 2, 1e11, 1e10))
  assert config.nft.micro_batch == 4
  fit = planning.largest_rows(config, small, "accumulate")
  assert (fit.knob, fit.configured, fit.largest, fit.live_bytes) == ("nft.micro_batch", 4, 2, live[2])
  assert fit.compiles <= 3
  plan = planning.plan_epoch(config, small, steps=("accumulate",))
  (line,) = planning.advice(plan, config)
  assert line.startswith("accumulate (one micro-batch) is over by")
  assert "nft.micro_batch" in line and "--config.model.remat=full" in line and "--config.reward.offload=True" in line
  assert "scan_blocks" not in line  # already scanned; blocks kept apart hold many gathered weights: scanning helps
  (apart,) = planning.advice(plan, planning._with(config, "model.scan_blocks", False))
  assert "--config.model.scan_blocks=True" in apart
  with pytest.raises(planning.PlanError, match="no chip figures"):
    planning.largest_rows(config, cpu, "accumulate")


# The message jax 0.10.2 + libtpu 0.0.42.1 gave for the paper's NFT step on v5e-16 (measured: launch/plan.py).
_REFUSAL = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (19.28G) "
            "exceeds available HBM (15.75G).")


class _Refused:
  """A traced step whose compile fails with `message`, as a TPU compile does when the step cannot fit."""

  jaxpr = None

  def __init__(self, message):
    self.message = message

  def lower(self):
    return self

  def compile(self):
    raise jax.errors.JaxRuntimeError(self.message)


def test_a_step_the_compiler_refuses_is_planned_as_not_fitting():
  assert planning.refused_temp_bytes(_REFUSAL) == int(19.28 * 2 ** 30)
  assert planning.refused_temp_bytes("INTERNAL: something else") is None
  args = (jax.ShapeDtypeStruct((1024, 1024), jnp.float32),)
  step, compiled = planning.compile_step("accumulate (one micro-batch)", _Refused(_REFUSAL), args, calls=3)
  assert compiled is None and step.refused.startswith("RESOURCE_EXHAUSTED")
  assert step.argument_bytes == 4 * 2 ** 20 and step.temp_bytes == int(19.28 * 2 ** 30) and step.flops == 0
  v5e = planning.CHIPS["v5e"]
  plan = planning.Plan(planning.Topology("v5e-16", jax.devices()[:1], v5e), {"data": 1}, [step], 0, {})
  text = planning.format_plan(plan)
  assert "DOES NOT FIT (refused by the compiler; over by at least" in text, text
  assert step.live_bytes > v5e.budget_bytes
  config = importlib.import_module("configs.kontext").get_config()
  tips = planning.advice(plan, config)
  assert len(tips) == 1 and "--config.model.remat=full" in tips[0] and "nft.micro_batch" in tips[0], tips
  with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):  # any other failure is not a plan
    planning.compile_step("accumulate (one micro-batch)", _Refused("INTERNAL: something else"), args)


@pytest.mark.parametrize("name", ["text encoding", "encode (VAE)", "decode (VAE)"])
def test_an_encoder_step_over_budget_is_advised_fewer_rollout_rows(name):
  """The prompt encoders' and VAE's steps run on a rollout chunk: rollout.batch_size is their rows."""
  args = (jax.ShapeDtypeStruct((1024, 1024), jnp.float32),)
  step, _ = planning.compile_step(name, _Refused(_REFUSAL), args)
  v5e = planning.CHIPS["v5e"]
  plan = planning.Plan(planning.Topology("v5e-16", jax.devices()[:1], v5e), {"data": 1}, [step], 0, {})
  (tip,) = planning.advice(plan, importlib.import_module("configs.kontext").get_config())
  assert tip.startswith(f"{name} is over by") and "fewer rows per shard (rollout.batch_size" in tip, tip
  assert "remat" not in tip and "nft.micro_batch" not in tip, tip


def test_kernel_flops_are_counted_once_per_grid_step():
  """The splash kernel (a pallas_call, interpret mode here) does the forward's QK^T and PV like XLA's attention:
  4 B H L^2 D FLOPs, counted from its body per grid step and kept apart (`_kernel_flops`) from what XLA's cost
  analysis sees; its backward recomputes the logits in both kernels: 4.5x the forward against XLA's 3x."""
  from editr1_jax.attention import attention
  b, length, heads, dim = 2, 384, 4, 128
  q = k = v = jnp.zeros((b, length, heads, dim), jnp.float32)
  forward = 4 * b * heads * length ** 2 * dim
  for impl, grad_ratio in (("xla", 3.0), ("splash", 4.5)):
    fwd = jax.make_jaxpr(lambda q, k, v: attention(q, k, v, implementation=impl))(q, k, v).jaxpr
    grad = jax.make_jaxpr(jax.grad(lambda q, k, v: attention(q, k, v, implementation=impl).sum(), (0, 1, 2)))(
        q, k, v).jaxpr
    assert planning.matmul_flops(fwd) == forward
    assert planning.matmul_flops(grad) == pytest.approx(grad_ratio * forward, rel=1e-3)  # + a row sum
    kernel = planning._kernel_flops(fwd)
    assert kernel == (forward if impl == "splash" else 0)
    assert planning.matmul_flops(fwd, kernels=False) == forward - kernel
