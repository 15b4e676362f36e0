"""Qwen2-VL inputs without PyTorch: the image processor and the chat formatting of one judging turn.

The image path equals transformers' PIL `Qwen2VLImageProcessor` bit for bit: smart resize to
multiples of patch * merge within the folder's pixel bounds (PIL bicubic on uint8), rescale in
float64 then float32, CLIP mean/std, the still image repeated over the temporal patch, and the
patch order (merge groups, then channel, time, row, column) the vision tower expects.

The text path renders the folder's chat template (transformers' Jinja renderer, so templates behave
as with `apply_chat_template`), tokenises with the folder's `tokenizer.json` and expands each
`<|image_pad|>` to one token per merged patch, as `Qwen2_5_VLProcessor` does. Rows are padded on the
left so that the first answer position is the last position of every row.
"""

import dataclasses
import json
import math
from typing import Sequence

import numpy as np
from PIL import Image

from editr1_jax import images, paths

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<|image_pad|>"
MAX_ASPECT_RATIO = 200
# Qwen2.5-VL's preprocessor_config.json bounds (min_pixels 56 x 56, max_pixels 28 x 28 x 16384): for sizing its
# inputs without a folder (planning).
DEFAULT_PIXELS = (56 * 56, 28 * 28 * 16384)


class ProcessorError(ValueError):
  """Bad processor input or configuration; the message names the file, field or image."""


# --------------------------------------------------------------------------------------------------
# Images
@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """The fields of `preprocessor_config.json` that change the output."""

  min_pixels: int
  max_pixels: int
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  rescale_factor: float = 1 / 255
  resample: int = Image.Resampling.BICUBIC

  @property
  def factor(self) -> int:
    """Resized sides are multiples of this: one merged patch."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

  def num_tokens(self, grid_thw: Sequence[int]) -> int:
    """LLM tokens of one image: one per merge_size x merge_size patches."""
    return int(np.prod(grid_thw)) // self.merge_size**2

  def resized(self, height: int, width: int) -> tuple[int, int]:
    """The (height, width) in pixels this processor resizes a `height` x `width` image to (`smart_resize`)."""
    return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

  def with_pixels(self, min_pixels: int | None = None, max_pixels: int | None = None) -> "ImageProcessorConfig":
    """These pixel bounds in place of its own where given (a judge's recommended ones); min above max is an error
    (the caller names where the bounds came from)."""
    low = self.min_pixels if min_pixels is None else min_pixels
    high = self.max_pixels if max_pixels is None else max_pixels
    if low > high:
      raise ProcessorError(f"min {low} exceeds max {high}")
    return dataclasses.replace(self, min_pixels=low, max_pixels=high)

  @classmethod
  def from_folder(cls, folder: str, name: str = "preprocessor_config.json") -> "ImageProcessorConfig":
    path = paths.join(folder, name)
    if not paths.isfile(path):
      raise ProcessorError(f"{path}: image processor config not found")
    try:
      raw = json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
      raise ProcessorError(f"{path}: not valid JSON: {e}") from e
    return cls.from_dict(raw, source=path)

  @classmethod
  def from_dict(cls, raw: dict, source: str) -> "ImageProcessorConfig":
    """As transformers reads it: `min_pixels` / `max_pixels` win over `size.shortest_edge` / `longest_edge`."""
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
      if raw.get(flag, True) is not True:
        raise ProcessorError(f"{source}: field {flag!r} is {raw[flag]!r}; only the default (true) is supported")
    size = raw.get("size") or {}
    if not isinstance(size, dict):
      raise ProcessorError(f"{source}: field 'size' must be an object, got {size!r}")
    bounds = {}
    for field, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
      value = raw.get(field, size.get(size_key))
      if value is None:
        raise ProcessorError(f"{source}: field {field!r} (or 'size.{size_key}') is missing")
      bounds[field] = _positive_int(value, field, source)
    if bounds["min_pixels"] > bounds["max_pixels"]:
      raise ProcessorError(f"{source}: min_pixels {bounds['min_pixels']} exceeds max_pixels {bounds['max_pixels']}")
    kw = {}
    for field in ("patch_size", "temporal_patch_size", "merge_size"):
      if field in raw:
        kw[field] = _positive_int(raw[field], field, source)
    for field in ("image_mean", "image_std"):
      if field in raw:
        value = raw[field]
        if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)):
          raise ProcessorError(f"{source}: field {field!r} must be a list of 3 numbers, got {value!r}")
        if field == "image_std" and min(value) <= 0:
          raise ProcessorError(f"{source}: field 'image_std' must be positive, got {value!r}")
        kw[field] = tuple(float(v) for v in value)
    if "rescale_factor" in raw:
      if not _is_number(raw["rescale_factor"]) or raw["rescale_factor"] <= 0:
        raise ProcessorError(f"{source}: field 'rescale_factor' must be a positive number, got {raw['rescale_factor']!r}")
      kw["rescale_factor"] = float(raw["rescale_factor"])
    if "resample" in raw:
      valid = {int(r) for r in Image.Resampling}
      if raw["resample"] not in valid:
        raise ProcessorError(f"{source}: field 'resample' must be a PIL resampling filter {sorted(valid)}, "
                             f"got {raw['resample']!r}")
      kw["resample"] = int(raw["resample"])
    return cls(**bounds, **kw)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(value, field: str, source: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ProcessorError(f"{source}: field {field!r} must be a positive integer, got {value!r}")
  return value


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
  """Sides rounded to multiples of `factor`, area brought within [min_pixels, max_pixels], aspect kept."""
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ProcessorError(f"image of {height}x{width}: aspect ratio above {MAX_ASPECT_RATIO}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def to_rgb(image) -> Image.Image:
  """A PIL image (`images.to_rgb`: transparency composited on white, as transformers does) or a uint8 (H, W, 3)
  array."""
  if isinstance(image, Image.Image):
    try:
      return images.to_rgb(image, "image")
    except images.ImageError as e:
      raise ProcessorError(str(e)) from e
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ProcessorError(f"an image array must be uint8 (H, W, 3), got {array.dtype} {array.shape}")
  return Image.fromarray(array, mode="RGB")


def read_image(path: str) -> Image.Image:
  """Decode an image file as the dataset and the editor do (`images.load_rgb`); errors name the file."""
  try:
    return images.load_rgb(path)
  except images.ImageError as e:
    raise ProcessorError(str(e)) from e


def preprocess_image(image, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
  """One still image -> (patches (gh*gw, 3*T*P*P) float32, grid (1, gh, gw))."""
  rgb = to_rgb(image)
  height, width = cfg.resized(rgb.height, rgb.width)
  resized = np.asarray(rgb.resize((width, height), resample=cfg.resample))  # uint8 (H, W, 3)
  pixels = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
  pixels = (pixels - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
  p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  gh, gw = height // p, width // p
  # (H, W, C) -> (gh/m, m, p, gw/m, m, p, C) -> (gh/m, gw/m, m, m, C, p, p): merge groups are contiguous.
  patches = pixels.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
  patches = np.broadcast_to(patches[:, :, :, :, :, None], patches.shape[:5] + (t, p, p))  # still image: repeat in time
  return patches.reshape(gh * gw, cfg.patch_dim), (1, gh, gw)


def preprocess_images(images: Sequence, cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
  """Images concatenated in order -> pixel_values (N_patches, patch_dim) float32, image_grid_thw (N, 3) int64."""
  if not images:
    raise ProcessorError("no images to preprocess")
  out = [preprocess_image(im, cfg) for im in images]
  return np.concatenate([p for p, _ in out]), np.asarray([g for _, g in out], np.int64)


# --------------------------------------------------------------------------------------------------
# Chat
def _read_json(path: str) -> dict:
  try:
    return json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise ProcessorError(f"{path}: not valid JSON: {e}") from e


def read_chat_template(folder: str) -> tuple[str, str]:
  """(template, the file it came from): `chat_template.jinja`, else `tokenizer_config.json`, else
  `chat_template.json`, the places transformers saves it."""
  jinja = paths.join(folder, "chat_template.jinja")
  if paths.isfile(jinja):
    with paths.open(jinja, encoding="utf-8") as f:
      return f.read(), jinja
  for name in ("tokenizer_config.json", "chat_template.json"):
    path = paths.join(folder, name)
    if paths.isfile(path):
      template = _read_json(path).get("chat_template")
      if template is None:
        continue
      if not isinstance(template, str):
        raise ProcessorError(f"{path}: field 'chat_template' must be one template string, got {type(template).__name__}")
      return template, path
  raise ProcessorError(f"{folder}: no chat template (chat_template.jinja, tokenizer_config.json or chat_template.json)")


class ChatFormatter:
  """One user turn of images then text, tokenised with image pads expanded, from a model folder (a path or a gs://
  URL: the tokenizer is built from the text of its tokenizer.json, as `Tokenizer.from_file` does)."""

  def __init__(self, folder: str, image_cfg: ImageProcessorConfig):
    from tokenizers import Tokenizer
    path = paths.join(folder, "tokenizer.json")
    if not paths.isfile(path):
      raise ProcessorError(f"{path}: tokenizer not found")
    try:
      self.tokenizer = Tokenizer.from_str(paths.read_text(path))
    except Exception as e:  # the Rust side raises a plain Exception
      raise ProcessorError(f"{path}: unreadable tokenizer: {e}") from e
    self.source = path
    self.template, self.template_source = read_chat_template(folder)
    config_path = paths.join(folder, "tokenizer_config.json")
    config = _read_json(config_path) if paths.isfile(config_path) else {}
    # apply_chat_template passes the special tokens to the template: do the same.
    self.template_kwargs = {k: _token_text(config[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                            if config.get(k) is not None}
    self.image_cfg = image_cfg
    self.image_token_id = self.special_token_id(IMAGE_TOKEN)
    self._special_texts = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]

  def special_token_id(self, text: str) -> int:
    token_id = self.tokenizer.token_to_id(text)
    if token_id is None:
      raise ProcessorError(f"{self.source}: token {text!r} is not in the vocabulary")
    return token_id

  def single_token_id(self, text: str) -> int:
    """The id `text` encodes to; an error if it is not exactly one token."""
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
      raise ProcessorError(f"{self.source}: {text!r} is not a single token (ids {ids})")
    return ids[0]

  def render(self, text: str, num_images: int, text_first: bool = False) -> str:
    """The chat template applied to one user turn (images first, then text, or the text first) with the answer
    prompt."""
    from transformers.utils.chat_template_utils import render_jinja_template
    for special in self._special_texts:
      if special in text:
        raise ProcessorError(f"prompt text contains the special token {special!r}: {text!r}")
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    if text_first:
      content = content[-1:] + content[:-1]
    rendered, _ = render_jinja_template([[{"role": "user", "content": content}]], chat_template=self.template,
                                        add_generation_prompt=True, **self.template_kwargs)
    return rendered[0]

  def encode(self, text: str, grids: Sequence[Sequence[int]], text_first: bool = False) -> np.ndarray:
    """Token ids (int32) of the turn, each image's pad expanded to its number of merged patches."""
    ids = np.asarray(self.tokenizer.encode(self.render(text, len(grids), text_first)).ids, np.int32)
    pads = np.flatnonzero(ids == self.image_token_id)
    if len(pads) != len(grids):
      raise ProcessorError(f"{self.template_source}: the chat template rendered {len(pads)} {IMAGE_TOKEN} tokens "
                           f"for {len(grids)} images")
    counts = np.ones(len(ids), np.int64)
    counts[pads] = [self.image_cfg.num_tokens(g) for g in grids]
    return np.repeat(ids, counts)


def _token_text(value) -> str:
  """tokenizer_config stores a special token as a string or as an AddedToken dict."""
  return value["content"] if isinstance(value, dict) else value


def pad_left(rows: Sequence[np.ndarray], length: int | None = None, pad_id: int = 0):
  """Left-pad token rows to one length -> (input_ids (B, L) int32, attention_mask (B, L) int32, answer
  positions (B,) int32). With left padding the first answer is read at L - 1 in every row."""
  longest = max(len(r) for r in rows)
  length = longest if length is None else length
  if length < longest:
    raise ProcessorError(f"pad length {length} is shorter than the longest row ({longest} tokens)")
  input_ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    input_ids[i, length - len(r):] = r
    mask[i, length - len(r):] = 1
  return input_ids, mask, np.full(len(rows), length - 1, np.int32)
