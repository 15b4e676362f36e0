"""Validation of a run config: every error names the field (as `config.a.b`) and what it needs."""

import os

import ml_collections

CHOICES = {
    "model.remat": ("none", "full", "flux"),
    "model.attention_impl": ("xla", "cudnn"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.adapter_dtype": ("float32", "bfloat16"),
    "reward.kind": ("mllm", "colour"),
    "reward.dtype": ("float32", "bfloat16"),
    "rollout.sampler": ("dpm2", "euler", "sde"),
    "rollout.eval_sampler": ("dpm2", "euler", "sde"),
    "advantage.std": ("global", "group"),
    "advantage.mode": ("all", "positive", "negative", "binary"),
    "filter.semantics": ("paper", "public", "none"),
    "nft.old_policy_schedule": (0, 1, 2),
}
POSITIVE_INTS = ("num_epochs", "checkpoint_every", "data.groups_per_epoch", "data.resolution", "data.t5_max_length",
                 "rollout.num_steps", "rollout.batch_size", "rollout.eval_steps", "nft.micro_batch",
                 "reward.batch_size", "lora.rank", "max_nonfinite_updates", "keep_checkpoints",
                 "data.prompt_cache_entries")
NON_NEGATIVE_INTS = ("eval_every", "eval_samples", "log_images_every")
UNIT_INTERVAL = ("filter.tau_mu", "filter.tau_sigma", "nft.timestep_fraction", "nft.ema_max_decay")


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
  for field, choices in CHOICES.items():
    if _get(config, field) not in choices:
      raise ConfigError(f"config.{field} = {_get(config, field)!r}; expected one of {choices}")
  for field in POSITIVE_INTS:
    v = _get(config, field)
    if not isinstance(v, int) or v <= 0:
      raise ConfigError(f"config.{field} = {v!r}; expected a positive integer")
  for field in NON_NEGATIVE_INTS:
    v = _get(config, field)
    if not isinstance(v, int) or v < 0:
      raise ConfigError(f"config.{field} = {v!r}; expected a non-negative integer")
  for field in UNIT_INTERVAL:
    v = _get(config, field)
    if not 0.0 <= float(v) <= 1.0:
      raise ConfigError(f"config.{field} = {v!r}; expected a value in [0, 1]")
  if config.data.group_size < 2:
    raise ConfigError(f"config.data.group_size = {config.data.group_size}; a group needs at least 2 rollouts")
  if config.data.resolution % 16:
    raise ConfigError(f"config.data.resolution = {config.data.resolution}; must be a multiple of 16")
  if int(config.rollout.num_steps * config.nft.timestep_fraction) < 1:
    raise ConfigError("config.nft.timestep_fraction * config.rollout.num_steps must leave at least one training "
                      "timestep")
  if config.nft.beta <= 0:
    raise ConfigError(f"config.nft.beta = {config.nft.beta}; expected > 0")
  if config.nft.kl_weight < 0 or config.advantage.clip <= 0 or config.optim.learning_rate <= 0:
    raise ConfigError("config.nft.kl_weight must be >= 0, config.advantage.clip and config.optim.learning_rate > 0")
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
  if not config.model.tiny:
    _require_dir(config, "model.pipeline_dir")
  if config.reward.kind == "mllm" and not config.reward.tiny:
    _require_dir(config, "reward.model_dir")
  _require_dir(config, "data.dataset_dir")
  for field in ("reward.template_file", "model.init_lora"):
    path = _get(config, field)
    if path and not os.path.isfile(path):
      raise ConfigError(f"config.{field} = {path!r}: file not found")


def _require_dir(config, field: str) -> None:
  path = _get(config, field)
  if not path:
    raise ConfigError(f"config.{field} is empty: set it to a folder (e.g. --config.{field}=/path)")
  if not os.path.isdir(path):
    raise ConfigError(f"config.{field} = {path!r}: folder not found")
