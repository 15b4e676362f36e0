"""The Edit-R1 dataset folder: `images/...`, `train_metadata.jsonl`, `test_metadata.jsonl`.

One JSON object a line: {"prompt": instruction, "image": path relative to the folder,
"requirement": task requirement, "category": optional}. Everything is validated up front; an
error names the file and line. Nothing is dropped silently.
"""

import dataclasses
import io
import json
import os

from PIL import Image

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


def read_records(folder: str, split: str) -> list[Record]:
  if split not in SPLITS:
    raise DatasetError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
  path = os.path.join(folder, SPLITS[split])
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: metadata file not found")
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
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
      missing = [k for k in REQUIRED if k not in obj]
      if missing:
        raise DatasetError(f"{path}:{lineno}: missing field(s) {missing}")
      unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
      if unknown:
        raise DatasetError(f"{path}:{lineno}: unknown field(s) {unknown}")
      if not obj["prompt"].strip():
        raise DatasetError(f"{path}:{lineno}: empty instruction (field 'prompt')")
      image_path = os.path.normpath(os.path.join(folder, obj["image"]))
      check_image(image_path, where=f"{path}:{lineno}")
      records.append(Record(len(records), obj["prompt"], image_path, obj["requirement"], obj.get("category", "")))
  if not records:
    raise DatasetError(f"{path}: no records")
  return records


def check_image(path: str, where: str) -> None:
  if not os.path.isfile(path):
    raise DatasetError(f"{where}: image {path} not found")
  try:
    with Image.open(path) as im:
      im.verify()
  except Exception as e:  # PIL raises many types for corrupt files
    raise DatasetError(f"{where}: image {path} is unreadable: {e}") from e


def decode_image(data: bytes, where: str = "image") -> Image.Image:
  """Stored bytes -> RGB PIL image (lossless for PNG sources)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.convert("RGB")
  except Exception as e:
    raise DatasetError(f"{where}: image bytes are unreadable: {e}") from e
