"""A tensorflow-datasets builder for the Edit-R1 folder format, written as array_record.

Read back with `as_data_source()` (random access, works with grain), so no TensorFlow is needed.
Images are stored as their original file bytes (lossless) and decoded with PIL on read.
"""

import os

import grain
import numpy as np
import tensorflow_datasets as tfds

from editr1_jax.data import folder as folder_format


class EditR1(tfds.core.GeneratorBasedBuilder):
  """Edit-R1 editing prompts: source image, instruction, requirement, category."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, source_dir: str, **kwargs):
    self._source_dir = os.path.abspath(source_dir)
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
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
    return {split: self._generate_examples(folder_format.read_records(self._source_dir, split))
            for split in folder_format.SPLITS}

  def _generate_examples(self, records):
    for r in records:
      with open(r.image_path, "rb") as f:
        data = f.read()
      yield r.id, {"id": r.id, "prompt": r.prompt, "requirement": r.requirement, "category": r.category,
                   "image_bytes": data, "image_path": os.path.relpath(r.image_path, self._source_dir)}


def prepare(source_dir: str, data_dir: str) -> EditR1:
  """Validate and write the dataset once (a second call reuses what was written)."""
  builder = EditR1(source_dir=source_dir, data_dir=data_dir)
  builder.download_and_prepare()
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
            "category": _text(ex["category"]), "image": folder_format.decode_image(ex["image_bytes"], where)}


def read(split: "Split", record_ids, num_threads: int = 8) -> list[dict]:
  """The records `record_ids` (in that order), read and decoded by grain's threaded iterator."""
  ds = grain.MapDataset.source(np.asarray(record_ids, np.int64)).map(lambda i: split[int(i)])
  return list(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)))


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)
