"""What a dataset folder held when a run copied it: the folder and a SHA-256 of every file it reads
(both metadata files and every image they name).

The run's data copy and its checkpoints keep this, so a run never trains on a stale copy and a
resumed run notices a changed dataset. Hashing every image at every start would cost minutes on a
large dataset, so digests are cached by (size, mtime) in the copy's folder: a file whose size and
modification time are unchanged is not read again.
"""

import dataclasses
import hashlib
import json
import os

from editr1_jax.checkpoint import sha256_file
from editr1_jax.data import folder as folder_format

CACHE = "source_digests.json"


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  source: str  # the dataset folder, absolute
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
  paths = [os.path.join(source_dir, name) for name in folder_format.SPLITS.values()]
  for split in folder_format.SPLITS:
    paths += [r.image_path for r in records[split]]
  return list(dict.fromkeys(paths))


def compute(source_dir: str, paths: list[str], cache_dir: str | None = None) -> Fingerprint:
  """The fingerprint of `paths` under `source_dir`; `cache_dir` keeps digests keyed by (size, mtime)."""
  source_dir = os.path.abspath(source_dir)
  cache_path = os.path.join(cache_dir, CACHE) if cache_dir else None
  cache = {}
  if cache_path and os.path.isfile(cache_path):
    try:
      with open(cache_path) as f:
        cache = json.load(f)
    except ValueError:
      cache = {}  # a damaged cache only costs re-hashing
  files, fresh = {}, {}
  for path in paths:
    st = os.stat(path)
    key = os.path.abspath(path)
    hit = cache.get(key)
    digest = hit[2] if hit and hit[:2] == [st.st_size, st.st_mtime_ns] else sha256_file(path)
    fresh[key] = [st.st_size, st.st_mtime_ns, digest]
    rel = os.path.relpath(key, source_dir)
    files[key if rel.startswith("..") else rel] = digest
  if cache_path:
    os.makedirs(cache_dir, exist_ok=True)
    with open(cache_path + ".tmp", "w") as f:
      json.dump(fresh, f)
    os.replace(cache_path + ".tmp", cache_path)
  return Fingerprint(source_dir, files)


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
