"""Every random draw of a run, from (seed, stream, epoch, index) in one place: any process, any resume
and any batching computes the same numbers for the same rollout."""

import jax
import jax.numpy as jnp
import numpy as np

STREAMS = {"rollout": 0, "eval": 1, "train": 2, "micro_batches": 3, "edit": 4}


def key(seed: int, stream: str, epoch: int) -> jax.Array:
  """The base key of one stream in one epoch."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), STREAMS[stream]), epoch)


def row_keys(seed: int, stream: str, epoch: int, n: int) -> np.ndarray:
  """(n,) host key data: row i's key is fold_in(key(seed, stream, epoch), i)."""
  base = key(seed, stream, epoch)
  return np.asarray(jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))))


def numpy_rng(seed: int, stream: str, epoch: int) -> np.random.Generator:
  """A host generator (e.g. the order of micro-batches)."""
  return np.random.default_rng([seed, STREAMS[stream], epoch])
