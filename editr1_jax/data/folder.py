"""The Edit-R1 dataset folder: `images/...`, `train_metadata.jsonl`, `test_metadata.jsonl`.

One JSON object a line: {"prompt": instruction, "image": path relative to the folder,
"requirement": task requirement, "category": optional}. Everything is validated up front (every image
decoded as training will decode it); an error names the file and line. Nothing is dropped silently.
An `image` path must stay inside the folder unless the caller allows outside paths.

The folder may be a local path or a bucket URL (`gs://bucket/...`): everything is read through `paths`.
"""

import dataclasses
import io
import json
import os

from PIL import Image

from editr1_jax import images, paths

SPLITS = {"train": "train_metadata.jsonl", "test": "test_metadata.jsonl"}
REQUIRED = ("prompt", "image", "requirement")
OPTIONAL = ("category",)


class DatasetError(ValueError):
  """Bad dataset input; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Record:
  id: int  # 0-based line index in the split's metadata file: the group key
  prompt: str
  image_path: str  # absolute (a URL when the folder is in a bucket)
  requirement: str
  category: str


def read_records(folder: str, split: str, *, allow_outside: bool = False, decode_images: bool = True) -> list[Record]:
  """The split's records, validated; `allow_outside` admits `image` paths that leave `folder`. Without
  `decode_images` an image is only required to exist and to be non-empty (a start-up that reuses a validated
  copy: one listing of the folder, no image read)."""
  if split not in SPLITS:
    raise DatasetError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
  path = paths.join(folder, SPLITS[split])
  if not paths.isfile(path):
    raise DatasetError(f"{path}: metadata file not found")
  root = paths.absolute(folder)
  records, where = [], []
  # Decoded line by line, so that bad bytes are named by their line.
  for lineno, raw in enumerate(io.BytesIO(paths.read_bytes(path)), start=1):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DatasetError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
    if not line.strip():
      raise DatasetError(f"{path}:{lineno}: empty line")
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DatasetError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
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
    image = obj["image"]
    image_path = paths.normpath(image if paths.is_url(image) else paths.join(root, image))
    if not allow_outside and not paths.is_inside(image_path, root):
      raise DatasetError(f"{path}:{lineno}: field 'image' {image!r} leaves the dataset folder; outside "
                         f"paths must be allowed (config.data.allow_outside_paths)")
    try:
      paths.check_scheme(image_path, f"{path}:{lineno}: image")
    except paths.PathError as e:
      raise DatasetError(str(e)) from None
    if decode_images:
      check_image(image_path, where=f"{path}:{lineno}")
    where.append(f"{path}:{lineno}")
    records.append(Record(len(records), obj["prompt"], image_path, obj["requirement"], obj.get("category", "")))
  if not records:
    raise DatasetError(f"{path}: no records")
  if not decode_images:
    sizes = file_stats(root, [r.image_path for r in records])
    for at, r in zip(where, records):
      if r.image_path not in sizes:
        raise DatasetError(f"{at}: {r.image_path}: image not found")
      if sizes[r.image_path][0] == 0:
        raise DatasetError(f"{at}: {r.image_path}: image is empty (0 bytes)")
  return records


def file_stats(folder: str, files: list[str]) -> dict:
  """{file: (size, version)} of those `files` that exist; the version changes whenever a file is rewritten (a
  local file's mtime in ns, a bucket object's generation). Files under a bucket `folder` cost one listing of it,
  not a request each."""
  listing = paths.stat_tree(folder) if paths.is_url(folder) else {}
  out = {}
  for f in dict.fromkeys(files):
    st = listing.get(f) or paths.stat(f)
    if st is not None:
      out[f] = st
  return out


def _encodable(text: str) -> bool:
  """False for strings with lone surrogates (JSON allows "\\ud800"; nothing can write them as UTF-8)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def check_image(path: str, where: str) -> None:
  """Decode the image as training will (`images.load_rgb`), so a bad file stops the build, not a run: one
  DatasetError line naming `where` and the image."""
  where = f"{where}: {path}"
  if paths.is_url(path):  # an object's bytes are read once
    try:
      source = paths.read_bytes(path)
    except FileNotFoundError:
      raise DatasetError(f"{where}: image not found") from None
    empty = not source
  else:  # a local file is opened by name, so that PIL's message names it
    if not os.path.isfile(path):
      raise DatasetError(f"{where}: image not found")
    source, empty = path, os.path.getsize(path) == 0
  if empty:
    raise DatasetError(f"{where}: image is empty (0 bytes)")
  try:
    images.load_rgb(source, where)
  except images.ImageError as e:
    raise DatasetError(str(e)) from None


def decode_image(data: bytes, where: str = "image") -> Image.Image:
  """Stored bytes -> 8-bit RGB PIL image (`images.load_rgb`; lossless for 8-bit PNG sources). A bad image is one
  DatasetError line (no chained traceback)."""
  try:
    return images.load_rgb(data, where)
  except images.ImageError as e:
    raise DatasetError(str(e)) from None
