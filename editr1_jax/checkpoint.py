"""Orbax checkpoints of the whole run state: atomic, verified, restorable into the target sharding.

A checkpoint holds one pytree of arrays (`state`: adapters or full params, old params, EMA,
optimizer state, ...) and one JSON object (`meta`: epoch, step, counters, the config, the data's
fingerprint). Orbax writes into a temporary folder and renames it when complete (in a bucket, where a
rename is not atomic, it marks a finished checkpoint with a commit file instead), so a process killed
during a save leaves the previous checkpoint as the latest usable one. The folder may be a gs:// URL.

A file damaged later (truncated, overwritten, deleted) would surface as hundreds of lines of
tensorstore errors deep inside a restore. So after each save a manifest (size and SHA-256 of every
file of the checkpoint) is written beside it, and a checkpoint is verified against it before
anything is read: the error names the checkpoint and the damaged file.
"""

import json
import logging

import jax
import orbax.checkpoint as ocp

from editr1_jax import paths

MANIFEST = "editr1_manifest.json"
DAMAGED_SUFFIX = ".damaged"
_LOG = logging.getLogger(__name__)


class CheckpointDamaged(RuntimeError):
  """A checkpoint's files do not match its manifest, or its metadata does not parse."""


def _files(folder: str) -> list[str]:
  return [f for f in paths.walk_files(folder) if f != MANIFEST]


class Checkpointer:
  """`create=False` (readers such as the export) never creates the folder: a missing one is an error."""

  def __init__(self, directory: str, max_to_keep: int | None = 3, *, create: bool = True):
    self.directory = paths.absolute(directory)
    if not create and not paths.isdir(self.directory):
      raise FileNotFoundError(f"{self.directory}: no checkpoint folder")
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create))

  def all_epochs(self) -> list[int]:
    """The saved epochs as the folder holds them now (re-read: another process may have renamed one)."""
    self._manager.reload()
    return list(self._manager.all_steps())

  def path(self, epoch: int) -> str:
    return paths.join(self.directory, str(epoch))

  def save(self, epoch: int, state, meta: dict) -> None:
    self._manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()
    if jax.process_index() == 0:  # after the save is final on every process (orbax's barrier)
      folder = self.path(epoch)
      manifest = {f: [paths.getsize(paths.join(folder, f)), paths.sha256(paths.join(folder, f))]
                  for f in _files(folder)}
      paths.write_text(paths.join(folder, MANIFEST), json.dumps(manifest))  # atomic

  def verify(self, epoch: int) -> None:
    """Raises CheckpointDamaged naming the checkpoint and the first damaged item. A checkpoint without a
    manifest (killed between the save and its manifest) is verified by reading its metadata only."""
    folder = self.path(epoch)
    manifest_path = paths.join(folder, MANIFEST)
    if paths.isfile(manifest_path):
      try:
        manifest = json.loads(paths.read_text(manifest_path))
      except (OSError, ValueError) as e:
        raise CheckpointDamaged(f"checkpoint {folder}: {MANIFEST} is unreadable ({e})") from e
      for name, (size, digest) in manifest.items():
        path = paths.join(folder, name)
        if not paths.isfile(path):
          raise CheckpointDamaged(f"checkpoint {folder}: {name} is missing")
        if paths.getsize(path) != size:
          raise CheckpointDamaged(f"checkpoint {folder}: {name} has {paths.getsize(path)} bytes, {size} were saved")
        if paths.sha256(path) != digest:
          raise CheckpointDamaged(f"checkpoint {folder}: {name} is corrupted (its SHA-256 differs from the saved one)")
    try:
      self.restore_meta(epoch)
    except Exception as e:  # orbax raises many types for unreadable JSON
      raise CheckpointDamaged(f"checkpoint {folder}: meta/metadata is unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e

  def intact_epochs(self, *, newest_only: bool = False) -> tuple[list[int], dict[int, str]]:
    """(epochs that verify, {damaged epoch: reason}), both newest first; `newest_only` stops at the first intact
    one (what a resume needs: older checkpoints are not read)."""
    intact, damaged = [], {}
    for epoch in sorted(self.all_epochs(), reverse=True):
      try:
        self.verify(epoch)
        intact.append(epoch)
        if newest_only:
          break
      except CheckpointDamaged as e:
        damaged[epoch] = str(e)
    return intact, damaged

  def set_aside(self, epoch: int) -> str:
    """Renames a damaged checkpoint so it is never taken again, and never deletes it; returns the new path."""
    target = self.path(epoch) + DAMAGED_SUFFIX
    n = 1
    while paths.exists(target):
      target, n = f"{self.path(epoch)}{DAMAGED_SUFFIX}.{n}", n + 1
    paths.rename(self.path(epoch), target)
    return target

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
    meta = self._manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict):
      raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    return meta

  def close(self) -> None:
    self._manager.close()
