"""The Edit-R1 dataset folder: `images/...`, `train_metadata.jsonl`, `test_metadata.jsonl`.

One JSON object a line: {"prompt": instruction, "image": path relative to the folder,
"requirement": task requirement, "category": optional}. Everything is validated up front (every image
decoded as training will decode it); an error names the file and line. Nothing is dropped silently.
An `image` path must stay inside the folder unless the caller allows outside paths.
"""

import dataclasses
import json
import os

from PIL import Image

from editr1_jax import images

SPLITS = {"train": "train_metadata.jsonl", "test": "test_metadata.jsonl"}
REQUIRED = ("prompt", "image", "requirement")
OPTIONAL = ("category",)


class DatasetError(ValueError):
  """Bad dataset input; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Record:
  id: int  # 0-based line index in the split's metadata file: the group key
  prompt: str
  image_path: str  # absolute
  requirement: str
  category: str


def read_records(folder: str, split: str, *, allow_outside: bool = False, decode_images: bool = True) -> list[Record]:
  """The split's records, validated; `allow_outside` admits `image` paths that leave `folder`. Without
  `decode_images` an image is only required to exist (a start-up that reuses a validated copy)."""
  if split not in SPLITS:
    raise DatasetError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
  path = os.path.join(folder, SPLITS[split])
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: metadata file not found")
  root = os.path.abspath(folder)
  records = []
  with open(path, "rb") as f:  # decoded line by line, so that bad bytes are named by their line
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DatasetError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from e
      if not line.strip():
        raise DatasetError(f"{path}:{lineno}: empty line")
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{lineno}: malformed JSON: {e.msg}") from e
      if not isinstance(obj, dict):
        raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
      for key in REQUIRED + OPTIONAL:
        if key in obj and not isinstance(obj[key], str):
          raise DatasetError(f"{path}:{lineno}: field {key!r} must be a string, got {type(obj[key]).__name__}")
        if key in obj and not _encodable(obj[key]):
          raise DatasetError(f"{path}:{lineno}: field {key!r} holds an unpaired surrogate escape (\\ud800-\\udfff)")
      missing = [k for k in REQUIRED if k not in obj]
      if missing:
        raise DatasetError(f"{path}:{lineno}: missing field(s) {missing}")
      unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
      if unknown:
        raise DatasetError(f"{path}:{lineno}: unknown field(s) {unknown}")
      if not obj["prompt"].strip():
        raise DatasetError(f"{path}:{lineno}: empty instruction (field 'prompt')")
      image_path = os.path.normpath(os.path.join(root, obj["image"]))
      if not allow_outside and os.path.commonpath([root, image_path]) != root:
        raise DatasetError(f"{path}:{lineno}: field 'image' {obj['image']!r} leaves the dataset folder; outside "
                           f"paths must be allowed (config.data.allow_outside_paths)")
      if decode_images:
        check_image(image_path, where=f"{path}:{lineno}")
      elif not os.path.isfile(image_path):
        raise DatasetError(f"{path}:{lineno}: image {image_path} not found")
      records.append(Record(len(records), obj["prompt"], image_path, obj["requirement"], obj.get("category", "")))
  if not records:
    raise DatasetError(f"{path}: no records")
  return records


def _encodable(text: str) -> bool:
  """False for strings with lone surrogates (JSON allows "\\ud800"; nothing can write them as UTF-8)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def check_image(path: str, where: str) -> None:
  """Decode the image as training will (`images.load_rgb`), so a bad file stops the build, not a run."""
  try:
    images.load_rgb(path, f"{where}: {path}")
  except images.ImageError as e:
    raise DatasetError(str(e)) from e


def decode_image(data: bytes, where: str = "image") -> Image.Image:
  """Stored bytes -> 8-bit RGB PIL image (`images.load_rgb`; lossless for 8-bit PNG sources)."""
  try:
    return images.load_rgb(data, where)
  except images.ImageError as e:
    raise DatasetError(str(e)) from e
