"""A tensorflow-datasets builder for the Edit-R1 folder format, written as array_record.

Read back with `as_data_source()` (random access, works with grain), so no TensorFlow is needed.
Images are stored as their original file bytes (lossless) and decoded with PIL on read.

The dataset folder may be in a bucket (read through `paths`). So may the copy's folder `data_dir` (a workdir
`gs://.../tfds`), but array_record's reader and writer open local files only (given a gs:// path they hang) and
tfds cannot write to a bucket without TensorFlow. So for a URL `data_dir` the copy is built in a local cache,
`<cache_root>/tfds/<hash of the URL>` (`paths.cache_root()`: $EDITR1_CACHE, default ~/.cache/editr1_jax), and
uploaded to `data_dir` with its `source.json` marker written last (a half-uploaded copy has no marker and is never
trusted). A later start whose local cache is empty or stale (a fresh or preempted host) downloads the bucket copy
when its marker matches the source's fingerprint, instead of rebuilding it. Reads always go through the local copy.
"""

import hashlib
import json
import os
import shutil

import grain
import numpy as np
import tensorflow_datasets as tfds

from editr1_jax import paths
from editr1_jax.data import fingerprint as fp
from editr1_jax.data import folder as folder_format

SOURCE_FILE = "source.json"  # the folder and the contents' digest the copy was made from


class _LocalInfo(tfds.core.DatasetInfo):
  """The info of a local folder's dataset."""

  def initialize_from_bucket(self) -> None:
    """No look-up of pre-computed info on GCS: a local folder has none, and tfds' look-up leaves an empty
    `tmp*tfds` folder in the system temp dir on every first build."""


class EditR1(tfds.core.GeneratorBasedBuilder):
  """Edit-R1 editing prompts: source image, instruction, requirement, category."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, source_dir: str, allow_outside: bool = False, **kwargs):
    self._source_dir = paths.absolute(source_dir)
    self._allow_outside = allow_outside
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalInfo(
        builder=self,
        description="Instruction-based image editing prompts in the Edit-R1 folder format.",
        disable_shuffling=True,  # record i is line i of the metadata file: position == id
        features=tfds.features.FeaturesDict({
            "id": np.int64,
            "prompt": tfds.features.Text(),
            "requirement": tfds.features.Text(),
            "category": tfds.features.Text(),
            "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
            "image_path": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    # Validate every split before writing anything.
    return {split: self._generate_examples(folder_format.read_records(self._source_dir, split,
                                                                      allow_outside=self._allow_outside))
            for split in folder_format.SPLITS}

  def _generate_examples(self, records):
    for r in records:
      yield r.id, {"id": r.id, "prompt": r.prompt, "requirement": r.requirement, "category": r.category,
                   "image_bytes": paths.read_bytes(r.image_path),
                   "image_path": _relative(r.image_path, self._source_dir)}


def _relative(path: str, root: str) -> str:
  """`path` relative to `root`; as is when no relative path leads there (another bucket, a URL from a folder)."""
  try:
    return paths.relpath(path, root)
  except paths.PathError:
    return path


def fingerprint(source_dir: str, data_dir: str, *, allow_outside: bool = False) -> fp.Fingerprint:
  """Fingerprints what a build reads (digests cached in `data_dir`). Images are decoded only by a build: a
  start-up that reuses its copy reads each image once at most (to hash it, when its size or mtime changed)."""
  records = {split: folder_format.read_records(source_dir, split, allow_outside=allow_outside, decode_images=False)
             for split in folder_format.SPLITS}
  return fp.compute(source_dir, fp.read_files(source_dir, records), cache_dir=data_dir)


def prepare(source_dir: str, data_dir: str, source: fp.Fingerprint | None = None, *,
            allow_outside: bool = False) -> EditR1:
  """Validate and write the dataset once: a second call reuses the copy when it was made from the same folder
  with the same contents (`source`, computed if not given), and replaces it otherwise. `allow_outside` admits
  image paths that leave `source_dir`. A URL `data_dir` keeps its copy in the bucket and reads a local one (module
  docstring)."""
  source = source or fingerprint(source_dir, data_dir, allow_outside=allow_outside)
  made_from = {"source": source.source, "digest": source.digest}
  if not paths.is_url(data_dir):
    return _prepare_local(source_dir, data_dir, made_from, allow_outside)
  local = local_dir(data_dir)
  if _marker(local) != made_from and _marker(data_dir) == made_from:
    _copy_tree(data_dir, local, made_from)
  built = _prepare_local(source_dir, local, made_from, allow_outside)
  if _marker(data_dir) != made_from:
    _copy_tree(local, data_dir, made_from, only=os.path.relpath(built.data_dir, local))
  return built


def local_dir(data_dir: str) -> str:
  """Where the local copy of a bucket `data_dir` is built and read."""
  return os.path.join(paths.cache_root(), "tfds", hashlib.sha256(paths.normpath(data_dir).encode()).hexdigest()[:16])


def _marker(data_dir: str) -> dict | None:
  """What the copy in `data_dir` was made from (None: no complete copy)."""
  marker = paths.join(data_dir, SOURCE_FILE)
  if not paths.isfile(marker):
    return None
  try:
    return json.loads(paths.read_text(marker))
  except ValueError:
    return None


def _copy_tree(src: str, dst: str, made_from: dict, only: str = "") -> None:
  """The copy in `src` (its files below `only`: the finished dataset, not a build's leftover `incomplete.*`)
  replaces the one in `dst`. The marker is removed first and written last, so an interrupted transfer leaves no
  marker; the fingerprint's digest cache stays where it is."""
  keep = (SOURCE_FILE, fp.CACHE)
  if paths.isfile(paths.join(dst, SOURCE_FILE)):
    paths.remove(paths.join(dst, SOURCE_FILE))
  if not paths.is_url(dst):
    if os.path.isdir(dst):
      shutil.rmtree(dst)
  elif paths.isdir(dst):
    for rel in paths.walk_files(dst):
      if rel not in keep:
        paths.remove(paths.join(dst, rel))
  for rel in paths.walk_files(src):
    if rel not in keep and (not only or rel.startswith(only + "/")):
      paths.copy_file(paths.join(src, rel), paths.join(dst, rel))
  paths.write_text(paths.join(dst, SOURCE_FILE), json.dumps(made_from))


def _prepare_local(source_dir: str, data_dir: str, made_from: dict, allow_outside: bool) -> EditR1:
  """`prepare` in a local `data_dir`."""
  builder = EditR1(source_dir=source_dir, data_dir=data_dir, allow_outside=allow_outside)
  if _marker(data_dir) != made_from:
    if os.path.exists(builder.data_dir):  # a copy of another folder or of older contents: never reused
      shutil.rmtree(builder.data_dir)
    marker = os.path.join(data_dir, SOURCE_FILE)
    if os.path.exists(marker):
      os.remove(marker)
    builder = EditR1(source_dir=source_dir, data_dir=data_dir, allow_outside=allow_outside)
  builder.download_and_prepare()
  paths.write_text(os.path.join(data_dir, SOURCE_FILE), json.dumps(made_from))
  return builder


class Split:
  """Random access to one split by record id (records are written unshuffled: position == id)."""

  def __init__(self, builder: EditR1, split: str):
    self._source = builder.as_data_source(split=split)
    self._where = f"{builder.data_dir}:{split}"
    self.split = split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, record_id: int) -> dict:
    ex = self._source[int(record_id)]
    if int(ex["id"]) != record_id:
      raise folder_format.DatasetError(f"{self._where}: record at position {record_id} has id {int(ex['id'])}")
    where = f"{self._where}[{record_id}] ({_text(ex['image_path'])})"
    return {"id": int(ex["id"]), "prompt": _text(ex["prompt"]), "requirement": _text(ex["requirement"]),
            "category": _text(ex["category"]), "image": folder_format.decode_image(ex["image_bytes"], where),
            "image_path": _text(ex["image_path"])}  # relative to the dataset folder


def read(split: "Split", record_ids, num_threads: int = 8) -> list[dict]:
  """The records `record_ids` (in that order), read and decoded by grain's threaded iterator."""
  ds = grain.MapDataset.source(np.asarray(record_ids, np.int64)).map(lambda i: split[int(i)])
  return list(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)))


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)
