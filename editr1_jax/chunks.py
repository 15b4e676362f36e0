"""Fixed-size device calls: every call gets exactly `chunk` rows (the last chunk padded with copies of its
first row), so a function compiles once per shape and a row's result never depends on which rows
shared its call. That is what makes a resumed run compute exactly what the uninterrupted one did."""

import collections
from typing import Callable, Hashable, Sequence

import jax
import numpy as np

from editr1_jax import preemption
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
  concatenated as host arrays. A stop (SIGTERM) is checked before each call."""
  outs = []
  for idx, real in padded_chunks(n, chunk):
    preemption.check("before a device chunk")
    outs.append(jax.tree.map(lambda x: shd.to_host(x)[:real], fn(idx)))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


class RowCache:
  """key -> one row of each output of `encode` (a pytree of (n, ...) arrays for a list of n items), computed once
  per key (LRU-bounded) in fixed-size chunks: one compile per shape, and a row's value does not depend on which
  others were encoded with it. """

  def __init__(self, encode: Callable[[list], object], max_entries: int):
    if max_entries < 1:
      raise ValueError(f"max_entries must be at least 1, got {max_entries}")
    self._encode, self._max = encode, max_entries
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self.misses = 0

  def __call__(self, keys: Sequence[Hashable], items: Sequence, chunk: int):
    """Rows for `keys` stacked as host arrays; `items[i]` is what `encode` reads for `keys[i]` (first one wins)."""
    if len(keys) != len(items):
      raise ValueError(f"{len(keys)} keys but {len(items)} items")
    first = {}
    for key, item in zip(keys, items):
      first.setdefault(key, item)
    missing = [k for k in first if k not in self._entries]
    self.misses += len(missing)
    if missing:
      outs = map_chunks(lambda idx: self._encode([first[missing[i]] for i in idx]), len(missing), chunk)
      for i, key in enumerate(missing):
        self._entries[key] = jax.tree.map(lambda x, i=i: x[i], outs)
    for key in keys:
      self._entries.move_to_end(key)
    rows = [self._entries[k] for k in keys]
    while len(self._entries) > self._max:
      self._entries.popitem(last=False)
    return jax.tree.map(lambda *xs: np.stack(xs), *rows)
