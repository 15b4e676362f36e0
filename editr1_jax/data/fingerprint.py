"""What a dataset folder held when a run copied it: the folder and a SHA-256 of every file it reads
(both metadata files and every image they name).

The run's data copy and its checkpoints keep this, so a run never trains on a stale copy and a
resumed run notices a changed dataset. Hashing every image at every start would cost minutes on a
large dataset, so digests are cached by (size, version) in the copy's folder: a file whose size and
version are unchanged is not read again. The version is a local file's modification time, a bucket
object's generation (a new one at every write). The folder, its files and the cache may each be local
or in a bucket (`paths`): a bucket's files cost one listing, and a fresh host finds the cache there.
"""

import dataclasses
import hashlib
import json

from editr1_jax import paths
from editr1_jax.data import folder as folder_format

CACHE = "source_digests.json"


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  source: str  # the dataset folder, absolute (or a URL)
  files: dict  # path (relative to the folder when inside it) -> SHA-256

  @property
  def digest(self) -> str:
    return hashlib.sha256(json.dumps(sorted(self.files.items())).encode()).hexdigest()

  def to_json(self) -> dict:
    return {"source": self.source, "digest": self.digest, "files": self.files}

  @classmethod
  def from_json(cls, obj: dict) -> "Fingerprint":
    return cls(obj["source"], dict(obj["files"]))


def read_files(source_dir: str, records: dict) -> list[str]:
  """The absolute paths a dataset build reads: the metadata files, then every image named, once."""
  files = [paths.join(paths.absolute(source_dir), name) for name in folder_format.SPLITS.values()]
  for split in folder_format.SPLITS:
    files += [r.image_path for r in records[split]]
  return list(dict.fromkeys(files))


def compute(source_dir: str, files: list[str], cache_dir: str | None = None) -> Fingerprint:
  """The fingerprint of `files` under `source_dir`; `cache_dir` keeps digests keyed by (size, version)."""
  source_dir = paths.absolute(source_dir)
  cache_path = paths.join(cache_dir, CACHE) if cache_dir else None
  cache = {}
  if cache_path and paths.isfile(cache_path):
    try:
      cache = json.loads(paths.read_text(cache_path))
    except ValueError:
      cache = {}  # a damaged cache only costs re-hashing
  stats = folder_format.file_stats(source_dir, [paths.absolute(f) for f in files])
  out, fresh = {}, {}
  for path in files:
    key = paths.absolute(path)
    if key not in stats:
      raise folder_format.DatasetError(f"{key}: file not found")
    size, version = stats[key]
    hit = cache.get(key)
    digest = hit[2] if hit and hit[:2] == [size, version] else paths.sha256(key)
    fresh[key] = [size, version, digest]
    rel = key if not paths.is_inside(key, source_dir) else paths.relpath(key, source_dir)
    out[rel] = digest
  if cache_path and fresh != cache:
    paths.makedirs(cache_dir)
    paths.write_text(cache_path, json.dumps(fresh))
  return Fingerprint(source_dir, out)


def differences(old: Fingerprint, new: Fingerprint, limit: int = 5) -> list[str]:
  """What changed from `old` to `new`, one line per kind of change (a few names each)."""
  lines = []
  if old.source != new.source:
    lines.append(f"dataset folder: was {old.source}, now {new.source}")

  def names(keys):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")

  changed = [k for k in old.files.keys() & new.files.keys() if old.files[k] != new.files[k]]
  for what, keys in (("changed", changed), ("added", new.files.keys() - old.files.keys()),
                     ("removed", old.files.keys() - new.files.keys())):
    if keys:
      lines.append(f"{len(keys)} file(s) {what}: {names(keys)}")
  return lines
