"""Rewards as plug-ins (`base.py`: the `Reward` protocol, `RewardResult`, the registry). Importing this package
registers every reward below; `build(config, mesh, rules)` makes the one `config.reward.kind` names.
A new reward: a module here with `@register("kind")`, imported in this file."""

from editr1_jax.reward.base import REWARDS, Reward, RewardResult, build, kinds, register  # noqa: F401

# The implementations: importing them registers them.
from editr1_jax.reward import colour  # noqa: F401,E402  (kind "colour")
from editr1_jax.reward import mllm  # noqa: F401,E402  (kind "mllm")
