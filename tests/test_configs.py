"""Configs: the shipped ones load and validate; bad values are named; overrides work the ml-collections way."""

import importlib

import pytest

from editr1_jax import run_config


def _load(name):
  return importlib.import_module(f"configs.{name}").get_config()


def test_tiny_config_validates():
  run_config.validate(_load("tiny"), num_devices=8)


def test_kontext_config_is_the_paper_run():
  c = _load("kontext")
  assert (c.data.resolution, c.rollout.num_steps, c.rollout.sampler, c.rollout.guidance) == (512, 6, "dpm2", 2.5)
  assert (c.data.group_size, c.data.groups_per_epoch, c.lora.rank, c.lora.alpha) == (12, 24, 32, 64.0)
  assert (c.optim.learning_rate, c.nft.beta, c.nft.kl_weight, c.nft.old_policy_schedule) == (3e-4, 1.0, 1e-4, 1)
  assert (c.nft.ema_max_decay, c.filter.tau_mu, c.filter.tau_sigma) == (0.9, 0.9, 0.05)
  with pytest.raises(run_config.ConfigError, match=r"config.model.pipeline_dir is empty"):
    run_config.validate(c, num_devices=8)


@pytest.mark.parametrize("field,value,message", [
    ("rollout.sampler", "ddim", r"config.rollout.sampler = 'ddim'; expected one of"),
    ("num_epochs", 0, r"config.num_epochs = 0; expected a positive integer"),
    ("filter.tau_mu", 1.5, r"config.filter.tau_mu = 1.5; expected a value in \[0, 1\]"),
    ("data.group_size", 1, r"config.data.group_size = 1; a group needs at least 2"),
    ("data.resolution", 72, r"config.data.resolution = 72; must be a multiple of 16"),
    ("data.dataset_dir", "/nonexistent", r"config.data.dataset_dir = '/nonexistent': folder not found"),
    ("mesh.shape", (3, 1, 1), r"config.mesh.shape = \(3, 1, 1\) does not fit 8 devices"),
    ("reward.template_file", "/nonexistent.txt", r"config.reward.template_file = '/nonexistent.txt': file not found"),
])
def test_bad_values_name_the_field(field, value, message):
  c = _load("tiny")
  section, _, key = field.rpartition(".")
  (c[section] if section else c)[key] = value
  with pytest.raises(run_config.ConfigError, match=message):
    run_config.validate(c, num_devices=8)


def test_rollouts_must_divide_over_processes():
  c = _load("tiny")
  c.data.groups_per_epoch, c.data.group_size = 3, 3
  with pytest.raises(run_config.ConfigError, match="9 rollouts do not divide over 2 processes"):
    run_config.validate(c, num_devices=8, num_processes=2)
