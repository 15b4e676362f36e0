"""Orbax checkpoints of the whole run state, atomic, restorable into the target sharding.

A checkpoint holds one pytree of arrays (`state`: adapters or full params, old params, EMA,
optimizer state, RNG, sampler state ...) and one JSON object (`meta`: epoch, step, config
digest ...). Orbax writes into a temporary folder and renames it when complete, so a process
killed during a save leaves the previous checkpoint as the latest usable one.
"""

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int | None = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_epoch(self) -> int | None:
    self._manager.reload()
    return self._manager.latest_step()

  def all_epochs(self) -> list[int]:
    self._manager.reload()
    return list(self._manager.all_steps())

  def save(self, epoch: int, state, meta: dict) -> None:
    self._manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, epoch: int, abstract_state):
    """`abstract_state`: jax.ShapeDtypeStructs (with .sharding) or arrays giving the target layout;
    numpy leaves come back as numpy."""
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x,
        abstract_state)
    restored = self._manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                    meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_meta(self, epoch: int) -> dict:
    return self._manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    self._manager.close()
