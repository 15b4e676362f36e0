"""Prompt conditioning for Qwen-Image-Edit-2509, as diffusers' `QwenImageEditPlusPipeline` computes it.

Each condition image is seen twice: by Qwen2.5-VL at about 384 x 384 pixels (Lanczos-resized to sides that
are multiples of 32, then the Qwen2-VL image processor's own bicubic resize to multiples of 28), and by the
VAE at about 1024 x 1024 (multiples of 32, in [-1, 1]). The instruction is wrapped in the pipeline's system
template with one "Picture k: <|vision_start|><|image_pad|><|vision_end|>" per image; the conditioning is
the decoder's hidden states after the final norm with the template's first `drop` tokens removed, rows
padded with zeros on the right and a validity mask.

Where we differ from the pipeline: rows are batched (the pipeline encodes one prompt at a time); the image
tokens get Qwen2.5-VL's M-RoPE positions (the model's own; diffusers 0.42 with transformers 5 passes no
`mm_token_type_ids`, so transformers falls back to sequential positions there); the mask is always
returned (the pipeline replaces an all-ones mask by None); RGBA / palette images are made RGB before the
resize (`images.to_rgb`), not after.
"""

import functools
import hashlib
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from editr1_jax import chunks, latents, paths
from editr1_jax import sharding as shd
from editr1_jax.conditioning import _start
from editr1_jax.models import qwen2_5_vl
from editr1_jax.reward import processor as proc

CONDITION_AREA = 384 * 384  # pixels of an image as Qwen2.5-VL sees it
VAE_AREA = 1024 * 1024  # pixels of an image as the VAE sees it (and of the default output)
SIZE_MULTIPLE = 32  # both sizes round each side to a multiple of this
RESAMPLE = Image.Resampling.LANCZOS  # diffusers' VaeImageProcessor default
MAX_IMAGES = 3  # condition images per instruction (Qwen-Image-Edit-2509 is trained with 1 to 3)
MAX_SEQUENCE_LENGTH = 1024  # the pipeline's check_inputs refuses a larger max_sequence_length
TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
            "background), then explain how the user's text instruction should alter or modify the image. Generate a "
            "new image that meets the user's requirements while maintaining consistency with the original input where "
            "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_DROP = 64  # leading tokens dropped: the system turn and "<|im_start|>user\n" in Qwen2.5's vocabulary
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


# --------------------------------------------------------------------------------------------------
# Condition images (host).
def area_size(height: int, width: int, area: int) -> tuple[int, int]:
  """(height, width) of about `area` pixels with the image's aspect ratio, each rounded to a multiple of 32
  (Python's round, halves to even, as the pipeline's `calculate_dimensions`)."""
  if height <= 0 or width <= 0:
    raise ValueError(f"image size {height}x{width} must be positive")
  ratio = width / height
  w = math.sqrt(area * ratio)
  h = w / ratio
  return round(h / SIZE_MULTIPLE) * SIZE_MULTIPLE, round(w / SIZE_MULTIPLE) * SIZE_MULTIPLE


def vl_image_size(height: int, width: int) -> tuple[int, int]:
  """The size an image is resized to before the Qwen2-VL image processor."""
  return area_size(height, width, CONDITION_AREA)


def vae_image_size(height: int, width: int) -> tuple[int, int]:
  """The size of the image the VAE encodes; for the last condition image also the default output size."""
  return area_size(height, width, VAE_AREA)


def resize(image, size: tuple[int, int]) -> Image.Image:
  """A PIL image or uint8 (H, W, 3) array -> RGB PIL image of `size` (height, width), Lanczos."""
  height, width = size
  return proc.to_rgb(image).resize((width, height), resample=RESAMPLE)


def vl_image(image) -> Image.Image:
  """What the pipeline hands the Qwen2-VL processor for one condition image."""
  rgb = proc.to_rgb(image)
  return resize(rgb, vl_image_size(rgb.height, rgb.width))


def vae_image(image) -> np.ndarray:
  """The pipeline's VAE input for one condition image: (H, W, 3) float32 in [-1, 1]."""
  rgb = proc.to_rgb(image)
  return latents.to_array(resize(rgb, vae_image_size(rgb.height, rgb.width)))


def condition_text(instruction: str, num_images: int) -> str:
  """The prompt the text encoder reads: the template around one picture placeholder per image and the instruction."""
  return TEMPLATE.format("".join(PICTURE.format(k + 1) for k in range(num_images)) + instruction)


def _row_images(row, i: int) -> list:
  """One row's condition images as a list (a single image alone is a row of one)."""
  images = [row] if isinstance(row, (Image.Image, np.ndarray)) else list(row)
  if not 1 <= len(images) <= MAX_IMAGES:
    raise ValueError(f"row {i}: {len(images)} condition images; each instruction takes 1 to {MAX_IMAGES}")
  return images


def image_digest(images: Sequence) -> str:
  """SHA-256 of the RGB pixels and sizes of a row's images: equal for equal pixels, whatever the container."""
  h = hashlib.sha256()
  for image in images:
    pixels = np.asarray(proc.to_rgb(image))
    h.update(np.asarray(pixels.shape, np.int64).tobytes())
    h.update(np.ascontiguousarray(pixels).tobytes())
  return h.hexdigest()


# --------------------------------------------------------------------------------------------------
def load_tokenizer(folder: str):
  """The Qwen2 tokenizer the pipeline's processor encodes with: processor/ (tokenizer/ when processor/ has none); in
  a bucket from a local copy of that folder, which transformers needs. The concrete class: transformers' auto
  classes import torch."""
  from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
  for sub in ("processor", "tokenizer"):
    path = paths.join(folder, sub)
    if paths.isfile(paths.join(path, "tokenizer_config.json")):
      return Qwen2Tokenizer.from_pretrained(paths.local_copy(path))
  raise FileNotFoundError(f"{folder}: no tokenizer_config.json in processor/ or tokenizer/")


def encode_step(graphdef, drop: int, mesh, rules, state, batch: qwen2_5_vl.Batch, mask: jax.Array) -> jax.Array:
  """The device step (what `QwenImageTextEncoder` jits, the first four bound): hidden states after the final norm
  of the right-padded rows, the first `drop` positions cut, in the model's compute dtype (what the cache stores:
  half the bytes of float32 in a bfloat16 run, nothing lost), zero where `mask` (B, L) is 0."""
  model = nnx.merge(graphdef, state)
  with shd.use_mesh(mesh, rules):
    hidden = model.hidden_states(batch)[:, drop:]
    out = jnp.where(mask[..., None].astype(bool), hidden, jnp.zeros((), hidden.dtype))  # stored as computed
    return shd.constrain(out, ("batch", "seq", "act_embed"))


class QwenImageTextEncoder:
  """Qwen2.5-VL, its tokenizer and image processor config: (instructions, condition images) -> (embeddings, mask)."""

  def __init__(self, model: qwen2_5_vl.Qwen25VL, tokenizer, image_cfg: proc.ImageProcessorConfig, *,
               max_sequence_length: int | None = None, drop: int = TEMPLATE_DROP, mesh=None, rules=shd.DEFAULT_RULES):
    """`max_sequence_length`: every call returns this many tokens (fixed shapes; a longer prompt is an error);
    None: the longest row of the call, as the pipeline pads."""
    if max_sequence_length is not None and not 0 < max_sequence_length <= MAX_SEQUENCE_LENGTH:
      raise ValueError(f"max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH}] or None, got {max_sequence_length}")
    cfg = model.cfg
    self.model, self.tokenizer, self.image_cfg, self.cfg = model, tokenizer, image_cfg, cfg
    self.max_sequence_length, self.drop = max_sequence_length, drop
    self.mesh, self.rules = mesh, tuple(rules)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}
    pairs = {"image_token_id": (cfg.image_token_id, ids["<|image_pad|>"]),
             "vision_start_token_id": (cfg.vision_start_token_id, ids["<|vision_start|>"]),
             "vision_end_token_id": (cfg.vision_end_token_id, ids["<|vision_end|>"]),
             "patch_size": (cfg.vision.patch_size, image_cfg.patch_size),
             "spatial_merge_size": (cfg.vision.spatial_merge_size, image_cfg.merge_size),
             "temporal_patch_size": (cfg.vision.temporal_patch_size, image_cfg.temporal_patch_size)}
    bad = [f"{k}: model {ours} vs tokenizer / image processor {theirs}" for k, (ours, theirs) in pairs.items()
           if ours != theirs]
    if bad:
      raise ValueError(f"the text encoder's config disagrees with its tokenizer / image processor: {bad}")
    prefix = len(tokenizer(TEMPLATE.split("{}")[0])["input_ids"])
    if prefix < drop:  # else the dropped tokens would include images or instruction
      raise ValueError(f"the template's system turn is {prefix} tokens with this tokenizer, fewer than drop {drop}")
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    graphdef, self._state = nnx.split(model)
    self._step = jax.jit(functools.partial(encode_step, graphdef, drop, mesh, self.rules))

  @classmethod
  def from_pipeline(cls, folder: str, *, dtype: str = "float32", max_sequence_length: int | None = None, mesh=None,
                    rules=shd.DEFAULT_RULES, attention_impl: str = "auto") -> "QwenImageTextEncoder":
    """A diffusers Qwen-Image-Edit(-2509) folder: text_encoder/, processor/ (preprocessor_config.json, tokenizer)."""
    image_cfg = proc.ImageProcessorConfig.from_folder(paths.join(folder, "processor"))
    tokenizer = load_tokenizer(folder)
    model = qwen2_5_vl.load_qwen2_5_vl(paths.join(folder, "text_encoder"), dtype=dtype, mesh=mesh, rules=rules,
                                       attention_impl=attention_impl)
    return cls(model, tokenizer, image_cfg, max_sequence_length=max_sequence_length, mesh=mesh, rules=rules)

  # host -------------------------------------------------------------------------------------------
  def token_ids(self, instruction: str, grids: np.ndarray) -> np.ndarray:
    """The row's token ids, each <|image_pad|> expanded to its image's merged patches (as the processor does)."""
    ids = np.asarray(self.tokenizer(condition_text(instruction, len(grids)))["input_ids"], np.int32)
    pads = np.flatnonzero(ids == self.cfg.image_token_id)
    if len(pads) != len(grids):
      raise ValueError(f"instruction {_start(instruction)}: {len(pads)} <|image_pad|> tokens for {len(grids)} images "
                       "(the instruction must not hold vision tokens)")
    counts = np.ones(len(ids), np.int64)
    counts[pads] = [self.image_cfg.num_tokens(g) for g in grids]
    return np.repeat(ids, counts)

  def prepare(self, instructions: Sequence[str], images: Sequence) -> tuple[qwen2_5_vl.Batch, np.ndarray]:
    """(model batch, right-padded to drop + L tokens; output mask (B, L) int32). `images[i]`: row i's 1 to 3
    condition images (PIL or uint8 (H, W, 3)), or one image."""
    if isinstance(instructions, str) or len(instructions) != len(images) or not instructions:
      raise ValueError(f"need a non-empty list of instructions and one row of images each, got "
                       f"{'a string' if isinstance(instructions, str) else len(instructions)} and {len(images)} rows")
    bad = [i for i, t in enumerate(instructions) if not isinstance(t, str)]
    if bad:
      raise TypeError(f"instructions at rows {bad} are not strings")
    rows = [_row_images(r, i) for i, r in enumerate(images)]
    ids, pixels, grids = [], [], []
    for i, (text, row) in enumerate(zip(instructions, rows)):
      try:
        pv, g = proc.preprocess_images([vl_image(im) for im in row], self.image_cfg)
      except proc.ProcessorError as e:
        raise proc.ProcessorError(f"row {i} (instruction {_start(text)}): {e}") from e
      ids.append(self.token_ids(text, g))
      pixels.append(pv)
      grids.append(g)
    lengths = np.asarray([len(r) for r in ids]) - self.drop
    length = self.max_sequence_length or int(lengths.max())
    long = [f"{_start(t)} ({n})" for t, n in zip(instructions, lengths) if n > length]
    if long:
      raise ValueError(f"prompts longer than max_sequence_length {length} tokens (images included): {', '.join(long)}")
    input_ids = np.full((len(ids), self.drop + length), self.pad_id, np.int32)
    attention = np.zeros(input_ids.shape, np.int32)
    for i, r in enumerate(ids):
      input_ids[i, :len(r)], attention[i, :len(r)] = r, 1
    batch = qwen2_5_vl.prepare_batch(input_ids, attention, np.concatenate(pixels), np.concatenate(grids), self.cfg)
    return batch, (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)

  # device -----------------------------------------------------------------------------------------
  def __call__(self, instructions: Sequence[str], images: Sequence) -> tuple[jax.Array, np.ndarray]:
    """-> (prompt_embeds (B, L, hidden) in the compute dtype, zero past each row's tokens; mask (B, L) int32), one
    forward.
    With a mesh, rows are padded (row 0 repeated) to a multiple of the data-parallel width and dropped after."""
    n = len(instructions)
    extra = -n % shd.batch_width(self.mesh)
    batch, mask = self.prepare(list(instructions) + [instructions[0]] * extra, list(images) + [images[0]] * extra)
    placed = qwen2_5_vl.place_batch(batch, self.mesh, self.rules)
    embeds = self._step(self._state, placed, shd.put_rows(mask, self.mesh, self.rules))
    return embeds[:n] if extra else embeds, mask[:n]


# --------------------------------------------------------------------------------------------------
class ConditionCache:
  """(instruction, condition images) -> (prompt_embeds, mask), encoded once per distinct pair (key: the
  instruction and `image_digest` of its images). Needs fixed-length encodings (`max_sequence_length`)."""

  def __init__(self, encoder: QwenImageTextEncoder, max_entries: int = 4096):
    if encoder.max_sequence_length is None:
      raise ValueError("ConditionCache needs an encoder with a fixed max_sequence_length (rows of one length)")
    self.encoder = encoder
    self._rows = chunks.RowCache(lambda items: encoder([t for t, _ in items], [r for _, r in items]), max_entries)

  @property
  def misses(self) -> int:
    return self._rows.misses

  def __call__(self, instructions: Sequence[str], images: Sequence, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    if len(instructions) != len(images):
      raise ValueError(f"{len(instructions)} instructions but {len(images)} rows of images")
    rows = [_row_images(r, i) for i, r in enumerate(images)]
    keys = [(t, image_digest(r)) for t, r in zip(instructions, rows)]
    return self._rows(keys, list(zip(instructions, rows)), chunk)
