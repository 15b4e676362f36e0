"""Validation of a run config: every error names the field (as `config.a.b`) and what it needs.

Also the resume rule: a checkpoint stores the config it was trained with, and resuming with a config
that changes the meaning of the saved state is refused with every difference listed.
"""

import dataclasses
import json
import math

import ml_collections

from editr1_jax import advantages, attention, evaluation, families, nft, paths, sampling
from editr1_jax import reward as rewards
from editr1_jax.models import flux

DTYPES = ("float32", "bfloat16")
CHOICES = {
    "eval_accuracy": ("",) + tuple(evaluation.ACCURACIES),
    "model.preset": ("", "tiny"),
    "model.release": ("", "2509", "2511"),
    "model.remat": flux.REMAT_POLICIES,
    "model.attention_impl": attention.IMPLEMENTATIONS,
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.adapter_dtype": DTYPES,
    "reward.dtype": DTYPES,
    "rollout.sampler": sampling.SOLVERS,
    "rollout.eval_sampler": sampling.SOLVERS,
    "advantage.std": advantages.STD_MODES,
    "advantage.mode": nft.ADV_MODES,
    "filter.semantics": advantages.FILTERS,
    "nft.old_policy_schedule": nft.DECAY_SCHEDULES,
}
BOOLS = ("reward.tiny", "reward.offload", "data.ban_filtered", "data.allow_outside_paths", "data.accept_changed_data",
         "advantage.rloo", "optim.full_finetune", "eval_before_training", "model.scan_blocks")

# Fields that decide the layout of the saved state: a resume can never accept a change of them.
LAYOUT_FIELDS = ("model.scan_blocks",)

# Fields added after checkpoints were already written, with the value a run had before they existed (what a saved
# config without them meant): the blocks were kept apart, a layout a scanned model does not restore.
BEFORE_FIELD = {"model.scan_blocks": False}


@dataclasses.dataclass(frozen=True)
class Range:
  """A closed or open interval; `integer` also requires an int (bools are not ints here)."""
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  integer: bool = False

  def __contains__(self, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.integer and not isinstance(v, int)):
      return False
    if not math.isfinite(v):
      return False
    above = v > self.low if self.low_open else v >= self.low
    below = v < self.high if self.high_open else v <= self.high
    return above and below

  def __str__(self) -> str:
    kind = "an integer" if self.integer else "a finite number"
    if self.high == math.inf:
      return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
    return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def _ints(low: int) -> Range:
  return Range(low=low, integer=True)


POSITIVE, NON_NEGATIVE, UNIT = Range(low=0, low_open=True), Range(low=0), Range(0, 1)
DECAY = Range(0, 1, high_open=True)  # Adam betas, EMA decay: 1 would never move
RANGES = {
    "seed": _ints(0), "num_epochs": _ints(1), "checkpoint_every": _ints(1), "keep_checkpoints": _ints(1),
    "eval_every": _ints(0), "eval_samples": _ints(-1), "log_images_every": _ints(0),
    "max_nonfinite_updates": _ints(1), "max_invalid_reward_epochs": _ints(1), "eval_judge_max_new_tokens": _ints(1),
    "eval_judge_min_pixels": _ints(0), "eval_judge_max_pixels": _ints(0),
    "data.groups_per_epoch": _ints(1), "data.group_size": _ints(2), "data.resolution": _ints(16),
    "data.t5_max_length": _ints(1), "data.text_max_length": Range(1, 1024, integer=True),
    "data.prompt_cache_entries": _ints(1),
    "rollout.num_steps": _ints(1), "rollout.batch_size": _ints(1), "rollout.eval_steps": _ints(1),
    "rollout.guidance": NON_NEGATIVE, "rollout.eval_guidance": NON_NEGATIVE, "rollout.sde_noise": NON_NEGATIVE,
    "reward.batch_size": _ints(1),
    "lora.rank": _ints(1), "lora.alpha": POSITIVE,
    "advantage.clip": POSITIVE, "filter.tau_mu": UNIT, "filter.tau_sigma": UNIT,
    "nft.beta": POSITIVE, "nft.kl_weight": NON_NEGATIVE, "nft.timestep_fraction": Range(0, 1, low_open=True),
    "nft.micro_batch": _ints(1), "nft.ema_max_decay": DECAY,
    "optim.learning_rate": POSITIVE, "optim.b1": DECAY, "optim.b2": DECAY, "optim.weight_decay": NON_NEGATIVE,
    "optim.eps": POSITIVE, "optim.grad_clip": POSITIVE,  # a negative clip norm flips every update in optax
}

# Fields a resumed run may change: they do not change what the saved state means (cadence, logging, evaluation,
# batching of pure inference calls, where the data copy lives, the mesh the state is restored into). The
# dataset's content is checked by its fingerprint, not by its path.
RESUME_SAFE = ("num_epochs", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_samples", "eval_benchmark",
               "eval_benchmark_dir", "eval_benchmark_prompts", "eval_benchmark_items", "eval_accuracy",
               "eval_judge_dir", "eval_judge_max_new_tokens", "eval_judge_min_pixels", "eval_judge_max_pixels",
               "eval_before_training", "log_images_every", "max_nonfinite_updates", "max_invalid_reward_epochs",
               "resume_accept", "rollout.eval_steps", "rollout.eval_guidance", "rollout.eval_sampler",
               "reward.batch_size", "data.tfds_dir", "data.prompt_cache_entries", "data.dataset_dir",
               "data.accept_changed_data", "mesh.shape", "mesh.rules", "reward.offload", "compile_cache_dir")


class ConfigError(ValueError):
  pass


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if part not in node:
      raise ConfigError(f"config.{dotted}: missing field")
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1, num_processes: int = 1) -> None:
  """Every check that needs no model or data: run before anything is loaded."""
  if config.reward.kind not in rewards.REWARDS:  # registries are read at call time: a later entry is accepted
    raise ConfigError(f"config.reward.kind = {config.reward.kind!r}; expected one of {rewards.kinds()}")
  if config.model.family not in families.FAMILIES:
    raise ConfigError(f"config.model.family = {config.model.family!r}; expected one of {sorted(families.FAMILIES)}")
  for field, choices in CHOICES.items():
    if _get(config, field) not in choices:
      raise ConfigError(f"config.{field} = {_get(config, field)!r}; expected one of {tuple(choices)}")
  for field in BOOLS:
    if not isinstance(_get(config, field), bool):
      raise ConfigError(f"config.{field} = {_get(config, field)!r}; expected True or False")
  for field, valid in RANGES.items():
    if _get(config, field) not in valid:
      raise ConfigError(f"config.{field} = {_get(config, field)!r}; expected {valid}")
  named = {rule[0] for rule in config.mesh.rules}
  if "layers" not in named:  # the stacked blocks' axis (model.scan_blocks), absent from rule tables written before it
    raise ConfigError("config.mesh.rules has no rule for the logical axis 'layers' (the blocks stacked for a scan); "
                      "add ('layers', None): every chip holds its shard of every block")
  if config.eval_samples == 0:
    raise ConfigError("config.eval_samples = 0; use -1 for every test record, N > 0 for the first N "
                      "(config.eval_every = 0 turns evaluation off)")
  if config.data.resolution % 16:
    raise ConfigError(f"config.data.resolution = {config.data.resolution}; must be a multiple of 16")
  if int(config.rollout.num_steps * config.nft.timestep_fraction) < 1:
    raise ConfigError("config.nft.timestep_fraction * config.rollout.num_steps must leave at least one training "
                      "timestep")
  family = families.family_class(config.model.family)
  if config.model.release and config.model.release not in getattr(family, "releases", ()):
    raise ConfigError(f"config.model.release = {config.model.release!r}: the {config.model.family} family has no "
                      "releases to choose from (leave it '')")
  try:
    family.check_config(config)
    if not config.optim.full_finetune:
      family.check_lora_targets(tuple(config.lora.targets), "config.lora.targets")
  except ValueError as e:
    raise ConfigError(str(e)) from e
  for field in config.resume_accept:
    _get(config, field)
    if field in LAYOUT_FIELDS:
      raise ConfigError(f"config.resume_accept names {field!r}: it changes how the saved state is laid out, so a "
                        "checkpoint cannot be restored across it")
  if config.eval_benchmark:
    from editr1_jax.bench.run import TASKS
    if config.eval_benchmark not in TASKS:
      raise ConfigError(f"config.eval_benchmark = {config.eval_benchmark!r}; expected '' or one of {sorted(TASKS)}")
    if num_processes > 1:  # its files are written as one process sees them
      raise ConfigError("config.eval_benchmark runs in single-process runs; evaluate a multi-host run's export with "
                        "launch/evaluate.py")
    _require_dir(config, "eval_benchmark_dir")
    _require_dir(config, "eval_judge_dir")
    if config.eval_benchmark_prompts:
      _check_path(config, "eval_benchmark_prompts", "any")
    if config.eval_benchmark_items:
      if config.eval_benchmark != "imgedit":
        raise ConfigError("config.eval_benchmark_items: only ImgEdit takes an items file")
      _check_path(config, "eval_benchmark_items", "file")
    low, high = config.eval_judge_min_pixels, config.eval_judge_max_pixels
    if low and high and low > high:
      raise ConfigError(f"config.eval_judge_min_pixels = {low} exceeds config.eval_judge_max_pixels = {high}")
  rollouts = config.data.groups_per_epoch * config.data.group_size
  if rollouts % num_processes:
    raise ConfigError(f"config.data.groups_per_epoch * config.data.group_size = {rollouts} rollouts do not divide "
                      f"over {num_processes} processes")
  shape = tuple(config.mesh.shape)
  if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"config.mesh.shape = {shape}; expected three sizes (data, fsdp, tensor), at most one -1")
  fixed = 1
  for s in shape:
    fixed *= s if s != -1 else 1
  if num_devices % fixed or (-1 not in shape and fixed != num_devices):
    raise ConfigError(f"config.mesh.shape = {shape} does not fit {num_devices} devices")
  if not config.model.preset:
    _require_dir(config, "model.pipeline_dir")
  if config.reward.kind == "mllm" and not config.reward.tiny:
    _require_dir(config, "reward.model_dir")
  _require_dir(config, "data.dataset_dir")
  for field in ("reward.template_file", "model.init_lora"):
    if _get(config, field):
      _check_path(config, field, "file")
  for field in ("data.tfds_dir", "compile_cache_dir"):
    if _get(config, field) and _get(config, field) != "none":
      _check_path(config, field, "output")


def _require_dir(config, field: str) -> None:
  if not _get(config, field):
    raise ConfigError(f"config.{field} is empty: set it to a folder (e.g. --config.{field}=/path)")
  _check_path(config, field, "folder")


def _check_path(config, field: str, kind: str) -> None:
  """A local path or a URL (`paths`): an input of `kind` ("folder", "file", "any") must exist, an "output" must be
  writable there. Unsupported schemes, missing buckets or objects are one ConfigError naming the field."""
  path = _get(config, field)
  try:
    if kind == "output":
      paths.check_output(path, f"config.{field}")
    else:
      paths.check_input(path, f"config.{field}", kind=kind)
  except paths.PathError as e:
    reason = str(e)
    for prefix in (f"config.{field} {path}: ", f"{path}: "):
      reason = reason.removeprefix(prefix)
    raise ConfigError(f"config.{field} = {path!r}: {reason}") from None


def as_json(config: ml_collections.ConfigDict) -> dict:
  """The config as stored in a checkpoint (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def saved_config(saved: dict) -> ml_collections.ConfigDict:
  """The config a checkpoint was saved with, fields added since then at the value they had before (BEFORE_FIELD)."""
  config = ml_collections.ConfigDict(saved)
  for field, value in BEFORE_FIELD.items():
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
      if part not in node:
        break
      node = node[part]
    else:
      if leaf not in node:
        node[leaf] = value
  return config


def resume_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """The fields where `config` differs from the config a checkpoint was saved with, other than the fields in
  RESUME_SAFE and those the user accepts in `config.resume_accept`; one line each. A field the saved config
  lacks (added to the project after the checkpoint was written) has the value it had before it existed
  (BEFORE_FIELD), else counts as unchanged while it keeps its default."""
  from configs import base
  old, new = _flatten(as_json(saved_config(saved))), _flatten(as_json(config))
  defaults = _flatten(as_json(base.get_config()))
  accepted = set(RESUME_SAFE) | set(config.resume_accept)
  lines = []
  for field in sorted(set(old) | set(new)):
    if field in accepted or old.get(field, _ABSENT) == new.get(field, _ABSENT):
      continue
    if field not in old and field in defaults and new.get(field, _ABSENT) == defaults[field]:
      continue
    lines.append(f"config.{field}: saved {old.get(field, '(absent)')!r}, now {new.get(field, '(absent)')!r}")
  return lines


_ABSENT = object()
