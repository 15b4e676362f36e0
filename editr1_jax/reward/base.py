"""Rewards as plug-ins: the `Reward` protocol every reward implements, the `RewardResult` it returns, and
the registry that `config.reward.kind` selects from.

A new reward is one module and one config value: write a module in `editr1_jax/reward/` with a builder

  @register("mine")
  def build_mine(config, mesh, rules) -> Reward: ...

(or a class registered the same way, whose constructor takes (config, mesh, rules)), import it in
`editr1_jax/reward/__init__.py`, and run with `--config.reward.kind=mine`.

This module imports nothing heavy (no jax): `run_config` reads the registered kinds from it.
"""

import dataclasses
from typing import Callable, Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class RewardResult:
  scores: np.ndarray  # (N,) float32, higher is better; NaN where not valid (never 0)
  probs: np.ndarray | None  # (N, K) float32 (the MLLM: probabilities of "0".."5", NaN rows where not valid) or None
  valid: np.ndarray  # (N,) bool

  def __post_init__(self):
    n = np.shape(self.scores)
    if len(n) != 1 or np.shape(self.valid) != n or (self.probs is not None and np.shape(self.probs)[:1] != n):
      raise ValueError(f"RewardResult: scores {np.shape(self.scores)}, valid {np.shape(self.valid)} and probs "
                       f"{None if self.probs is None else np.shape(self.probs)} must have the same first axis (N,)")

  @property
  def num_invalid(self) -> int:
    return int((~self.valid).sum())


@runtime_checkable
class Reward(Protocol):
  """Scores edits. `sources`, `edits`: uint8 (H, W, 3) arrays, one pair per rollout; `records`: the dataset
  records, dicts with at least "prompt" (the instruction) and "requirement" (maybe "category", "id").
  `progress`: the label of a progress bar over the work (none when None)."""

  def score(self, sources: list[np.ndarray], edits: list[np.ndarray], records: list[dict], *,
            progress: str | None = None) -> RewardResult:
    ...


Builder = Callable[..., Reward]  # (config, mesh, rules) -> Reward
REWARDS: dict[str, Builder] = {}


def register(kind: str) -> Callable[[Builder], Builder]:
  """Decorator: `builder(config, mesh, rules)` (a function or a class) makes the reward of `config.reward.kind
  == kind`. Returns the builder unchanged. A kind registered twice is an error."""
  if not isinstance(kind, str) or not kind:
    raise ValueError(f"a reward kind is a non-empty string, not {kind!r}")

  def add(builder: Builder) -> Builder:
    if kind in REWARDS and REWARDS[kind] is not builder:
      raise ValueError(f"reward kind {kind!r} is already registered (by {_name(REWARDS[kind])}); "
                       f"{_name(builder)} cannot take it")
    REWARDS[kind] = builder
    return builder

  return add


def kinds() -> tuple[str, ...]:
  """The registered reward kinds, sorted: the allowed values of `config.reward.kind`."""
  return tuple(sorted(REWARDS))


def build(config, mesh=None, rules=None) -> Reward:
  """The reward `config.reward.kind` names, built from `config` (and placed on `mesh` with `rules`, where it
  has models; `rules` None: `sharding.DEFAULT_RULES`)."""
  kind = config.reward.kind
  if kind not in REWARDS:
    raise ValueError(f"config.reward.kind = {kind!r} is not a registered reward; registered: {list(kinds())} "
                     "(a new one: a module in editr1_jax/reward/ with @register(kind), imported in its __init__.py)")
  return REWARDS[kind](config, mesh, rules)


def _name(obj) -> str:
  return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
