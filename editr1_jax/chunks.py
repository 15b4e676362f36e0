"""Fixed-size device calls: every call gets exactly `chunk` rows (the last chunk padded with copies of its
first row), so a function compiles once per shape and a row's result never depends on which rows
shared its call. That is what makes a resumed run compute exactly what the uninterrupted one did."""

import jax
import numpy as np

from editr1_jax import sharding as shd


def padded_chunks(n: int, chunk: int):
  """(row indices of one call, padded to `chunk`; how many of them are real), for rows 0..n-1."""
  if chunk < 1:
    raise ValueError(f"chunk must be at least 1, got {chunk}")
  for start in range(0, n, chunk):
    idx = np.arange(start, min(start + chunk, n))
    yield np.concatenate([idx, np.full(chunk - len(idx), idx[0])]), len(idx)


def map_chunks(fn, n: int, chunk: int):
  """fn(row indices) over fixed-size chunks of rows 0..n-1 -> its per-row outputs (a pytree) for the n rows,
  concatenated as host arrays."""
  outs = [jax.tree.map(lambda x: shd.to_host(x)[:real], fn(idx)) for idx, real in padded_chunks(n, chunk)]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
