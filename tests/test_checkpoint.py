"""Orbax checkpoints: exact round trip (sharded), latest-epoch discovery, incomplete saves ignored."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from editr1_jax import sharding as shd
from editr1_jax.checkpoint import Checkpointer


def _state(mesh):
  w = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, PartitionSpec("fsdp", "tensor")))
  return {"params": {"w": w, "b": jnp.ones(3, jnp.bfloat16)}, "rng": jax.random.key_data(jax.random.key(3)),
          "banned": np.array([4, 9], np.int64)}


def test_round_trip_keeps_values_dtypes_and_sharding(tmp_path):
  mesh = shd.make_mesh((2, 2, 2))
  state = _state(mesh)
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(2, state, {"epoch": 2, "step": 7})
  ckpt.save(4, jax.tree.map(lambda x: x + 1, state), {"epoch": 4, "step": 9})
  assert ckpt.latest_epoch() == 4 and ckpt.all_epochs() == [2, 4]
  restored, meta = ckpt.restore(2, state)
  assert meta == {"epoch": 2, "step": 7}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert restored["params"]["w"].sharding.spec == PartitionSpec("fsdp", "tensor")


def test_incomplete_save_is_not_the_latest(tmp_path):
  """A save killed midway leaves only a temporary folder, which is never taken for a checkpoint."""
  mesh = shd.make_mesh((2, 2, 2))
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, _state(mesh), {"epoch": 1})
  os.makedirs(tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-12345" / "state")
  reopened = Checkpointer(str(tmp_path / "ckpt"))
  assert reopened.latest_epoch() == 1
  restored, meta = reopened.restore(1, _state(mesh))
  assert meta == {"epoch": 1}
