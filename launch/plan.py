"""Plan a run without its hardware: compile one epoch's device steps for a topology and print, per step and
per chip, argument / output / temporary bytes, FLOPs, a roofline time and whether it fits in HBM.

  python launch/plan.py --config=configs/kontext.py --topology=v5p-8 [--config.x=y ...]
  python launch/plan.py --config=configs/tiny.py                 # the local CPU devices
  python launch/plan.py --config=configs/kontext.py --topology=gpu --judge=7b
  python launch/plan.py --config=configs/kontext.py --topology=v6e-8 --fit   # + the largest rows that fit

No weights are read and nothing full-size is allocated: models are built with `jax.eval_shape`. TPU topologies
compile on compile-only devices from libtpu (`pip install libtpu==0.0.42.1`); `gpu` uses the local GPUs.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "cpu", "cpu (the local CPU devices), gpu (the local GPUs) or a TPU "
                                "slice: v4-8, v5e-8, v5p-8, v6e-8, ...")
_LAYERS = flags.DEFINE_string("layers", None, "Override the transformer depth as 'double,single' (quick plans; "
                              "the numbers then describe that depth, not the config's).")
_STEPS = flags.DEFINE_list("steps", None, "Steps to compile, default all: text (the prompt encoders), encode, "
                           "rollout, decode (the VAE's), judge (the MLLM reward's prefill, only for "
                           "config.reward.kind=mllm), accumulate, apply, update_old.")
_JUDGE = flags.DEFINE_enum("judge", None, ["7b", "32b", "tiny"], "The MLLM judge's size (Qwen2.5-VL). Default: the "
                           "sizes in config.reward.model_dir's config.json if it has one, else tiny for "
                           "config.reward.tiny, else 32b. Its parameters count as resident in every step.")
_FIT = flags.DEFINE_bool("fit", False, "Also search, by compiling, the largest rows per data-parallel shard that fit "
                         "the chip for each row-batched step (rollout.batch_size, reward.batch_size, nft.micro_batch).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  from editr1_jax import plan as planning
  layers = None
  if _LAYERS.value:
    try:
      layers = tuple(int(x) for x in _LAYERS.value.split(","))
      if len(layers) != 2 or min(layers) < 0:
        raise ValueError
    except ValueError:
      raise app.UsageError(f"--layers={_LAYERS.value!r}: expected two non-negative integers 'double,single'")
  steps = _STEPS.value or planning.STEPS
  unknown = [s for s in steps if s not in planning.STEPS]
  if unknown:
    raise app.UsageError(f"--steps: unknown {unknown}; choose from {list(planning.STEPS)}")
  try:
    topo = planning.topology(_TOPOLOGY.value)
    result = planning.plan_epoch(_CONFIG.value, topo, layers=layers, steps=steps,
                                 judge=_JUDGE.value, log=lambda m: print(m, file=sys.stderr, flush=True))
  except planning.PlanError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(planning.format_plan(result), flush=True)
  for line in planning.advice(result, _CONFIG.value):
    print(f"to fit: {line}", flush=True)
  if _FIT.value:
    try:
      for fit in planning.fit_rows(result, _CONFIG.value, layers=layers, judge=_JUDGE.value,
                                   log=lambda m: print(m, file=sys.stderr, flush=True)):
        print(fit, flush=True)
    except planning.PlanError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)


if __name__ == "__main__":
  app.run(main)
