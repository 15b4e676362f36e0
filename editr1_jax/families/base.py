"""The seam between the method and a base model: what differs between editors (FLUX.1-Kontext,
Qwen-Image-Edit, ...) lives behind `Family`; everything else (rollouts, reward, advantages, NFT,
checkpoints, export) is written once against it.

A condition is a flax struct of arrays whose `logical_axes()` names each field's axes; fields whose
first axis is "batch" are per-row, the others (position ids) are shared by every row. The row
helpers below use that, so the NFT step can gather, tile and shard any family's condition.
"""

from typing import Callable, ClassVar, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editr1_jax.layers import AdapterRows


class Family(Protocol):
  """A loaded base model. Host arrays in, host arrays out, except `velocity` (pure, jit-traced)."""

  name: ClassVar[str]
  benchmark_sampling: ClassVar[dict]  # steps, guidance, sampler the benchmark reproductions use (launch/evaluate.py)
  transformer: nnx.Module  # the policy network (with its LoRA adapters when trained with LoRA)

  @staticmethod
  def velocity(model, z: jax.Array, sigma: jax.Array, cond, adapters: AdapterRows | None = None) -> jax.Array:
    """v at the noisy target tokens z (B, L, C) and flow time sigma ((B,) in [0, 1])."""

  def condition_axes(self):
    """The logical axes of this family's condition (a condition-shaped pytree of tuples)."""

  def grid(self, height: int, width: int) -> tuple[int, int]:
    """The target's token grid for an image of height x width pixels."""

  def condition(self, sources: np.ndarray, instructions: Sequence[str], *, grid: tuple[int, int], guidance: float):
    """Source images (n, H, W, 3) in [-1, 1] and instructions -> the condition of n rows (host arrays)."""

  def sigmas(self, num_steps: int, grid: tuple[int, int]) -> np.ndarray:
    """The (num_steps + 1,) sampling schedule, ending in 0, of the folder's scheduler."""

  def noise_shape(self, grid: tuple[int, int]) -> tuple[int, ...]:
    """One row's latent (and initial noise) shape."""

  def decode(self, tokens: jax.Array, grid: tuple[int, int]) -> np.ndarray:
    """Latent tokens (n, L, C) -> images (n, H, W, 3) in ~[-1, 1] (host)."""

  def training_image(self, source, resolution: int) -> np.ndarray:
    """A dataset image -> the training input (resolution x resolution, [-1, 1])."""


FAMILIES: dict[str, Callable] = {}


def register(name: str):
  """Class decorator: `config.model.family = name` builds it with `cls.from_config(config, mesh, rules)`."""
  def add(cls):
    if FAMILIES.get(name, cls) is not cls:
      raise ValueError(f"model family {name!r} is already registered ({FAMILIES[name].__name__})")
    FAMILIES[name] = cls
    return cls
  return add


def family_class(name: str):
  if name not in FAMILIES:
    raise ValueError(f"config.model.family = {name!r} is not a registered family; registered: {sorted(FAMILIES)}")
  return FAMILIES[name]


def build(config, mesh=None, rules=None) -> Family:
  """The family named by `config.model.family`, loaded as `config.model` says (a preset or a folder)."""
  return family_class(config.model.family).from_config(config, mesh, rules)


# --------------------------------------------------------------------------------------------------
def _per_row(axes) -> bool:
  return bool(axes) and axes[0] == "batch"


def _map_rows(fn, cond, axes):
  """fn on the per-row leaves of `cond`, shared leaves unchanged."""
  leaves, treedef = jax.tree.flatten(cond)
  leaf_axes = treedef.flatten_up_to(axes)
  return treedef.unflatten([fn(x) if _per_row(a) else x for x, a in zip(leaves, leaf_axes)])


def take_rows(cond, axes, indices):
  """The rows `indices` of a condition (a device array for each per-row field)."""
  indices = np.asarray(indices)
  return _map_rows(lambda x: jnp.take(jnp.asarray(x), indices, axis=0), cond, axes)


def tile_rows(cond, axes, n: int):
  """The condition's rows repeated n times (the shared fields as they are)."""
  return _map_rows(lambda x: jnp.concatenate([x] * n, axis=0), cond, axes)


def host_rows(cond, axes, indices):
  """The rows `indices` of a host condition, as host arrays."""
  indices = np.asarray(indices)
  return _map_rows(lambda x: np.asarray(x)[indices], cond, axes)
