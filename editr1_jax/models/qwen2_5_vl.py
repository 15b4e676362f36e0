"""Qwen2.5-VL (vision tower + Qwen2 decoder), equal to transformers' `Qwen2_5_VLForConditionalGeneration`.

Everything that depends on the image sizes and on where the image tokens sit (the vision window/frame
structure, the M-RoPE position ids) is computed on the host with NumPy from `image_grid_thw` and
`input_ids` (`prepare_batch`), so the jitted part (`Qwen25VL.hidden_states`, `logits_at_batch`) only
sees arrays of static shapes. The decoder optionally reads and writes a preallocated `KVCache`
(`editr1_jax/generation.py` decodes with it).

Vision attention is exact: transformers runs it block-diagonally over the window-reordered patch
sequence (windows of `window_size` pixels, partial at the image edges) in most blocks and over
whole image frames in `fullatt_block_indexes`. Here each block-diagonal piece is gathered into a
padded group (G, S) and attended with a key-validity mask, then scattered back: the same sums,
without an (N, N) mask. Rotary, norm statistics and softmax run in float32.
"""

import dataclasses
import itertools
import math
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.attention import attention, check_implementation
from editr1_jax.layers import Dense, Embed, RMSNorm, StackedBlocks, remat_policy

REMAT_POLICIES = ("none", "full")


# --------------------------------------------------------------------------------------------------
# Configuration. Defaults are those of transformers' config classes, so a config.json that omits a
# key means here what it means to transformers; the presets spell every size out.
@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 3584
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112  # pixels
  out_hidden_size: int = 3584
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  rope_theta: float = 10000.0

  def __post_init__(self):
    if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
      raise ValueError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a multiple of 4 "
                       "(2-D rotary over half the head, h and w halves)")
    if self.window_size % (self.patch_size * self.spatial_merge_size):
      raise ValueError(f"vision window_size {self.window_size} must be a multiple of patch_size * spatial_merge_size "
                       f"= {self.patch_size * self.spatial_merge_size}")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"vision fullatt_block_indexes {bad} outside 0..{self.depth - 1}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Width of one row of `pixel_values`: channels x temporal patch x patch x patch."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2

  @property
  def window_units(self) -> int:
    """Window side in merged patches (4 for 112-pixel windows of 2x2-merged 14-pixel patches)."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  vocab_size: int = 152064
  hidden_size: int = 8192
  intermediate_size: int = 29568
  num_hidden_layers: int = 80
  num_attention_heads: int = 64
  num_key_value_heads: int = 8
  rms_norm_eps: float = 1e-5
  rope_theta: float = 1e6
  mrope_section: tuple[int, ...] = (16, 24, 24)  # rotary frequency pairs driven by (t, h, w) positions
  tie_word_embeddings: bool = False
  image_token_id: int = 151655
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  vision: VisionConfig = VisionConfig()
  # runtime, not architecture
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  attention_impl: str = "auto"  # one of attention.IMPLEMENTATIONS (editr1_jax/attention.py)
  remat: str = "none"  # one of REMAT_POLICIES

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                       f"{self.num_attention_heads}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                       f"{self.num_key_value_heads}")
    if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_dim:
      raise ValueError(f"mrope_section {self.mrope_section} must have 3 entries summing to head_dim / 2 = "
                       f"{self.head_dim // 2}")
    if self.vision.out_hidden_size != self.hidden_size:
      raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} must equal the text hidden_size "
                       f"{self.hidden_size}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    check_implementation(self.attention_impl)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def replace(self, **kw) -> "Qwen25VLConfig":
    return dataclasses.replace(self, **kw)

  _TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps")
  _ROOT_KEYS = ("image_token_id", "vision_start_token_id", "vision_end_token_id")
  _VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                  "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size")

  @classmethod
  def from_hf_config(cls, config: dict, *, source: str = "config", **runtime) -> "Qwen25VLConfig":
    """A `Qwen2_5_VLForConditionalGeneration` config.json: transformers 5 nests `text_config`; hub configs
    keep the text fields at the top level (and say `in_chans`, `rope_scaling`). Both are read."""
    text = wio.config_section(config, "text_config", source) or config
    in_text = "text_config." if text is not config else ""
    vision = dict(wio.config_section(config, "vision_config", source))
    for where, section in (("text_config", text), ("vision_config", vision)):
      if section.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: {where}.hidden_act: only 'silu' is supported, got {section['hidden_act']!r}")
    if text.get("use_sliding_window"):
      raise ValueError(f"{source}: use_sliding_window: sliding-window decoder attention is not supported")
    rope, in_rope = {}, ""
    for section, where, key in ((text, in_text, "rope_parameters"), (text, in_text, "rope_scaling"),
                                (config, "", "rope_scaling")):
      if section.get(key):
        rope, in_rope = wio.config_section(section, key, source), f"{where}{key}."
        break
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
      raise ValueError(f"{source}: rope type {rope_type!r}: only the default M-RoPE is supported")
    kw = wio.config_fields(cls, text, cls._TEXT_KEYS, source, required=False, prefix=in_text)
    kw.update(wio.config_fields(cls, config, cls._ROOT_KEYS, source, required=False))
    theta = rope.get("rope_theta", text.get("rope_theta", config.get("rope_theta")))
    if theta is not None:
      kw.update(wio.config_fields(cls, {"rope_theta": theta}, ("rope_theta",), source))
    kw.update(wio.config_fields(cls, rope, ("mrope_section",), source, required=False, prefix=in_rope))
    tied = [wio.config_fields(cls, c, ("tie_word_embeddings",), source, required=False, prefix=p)
            for c, p in ((config, ""), (text, in_text)) if c.get("tie_word_embeddings") is not None]
    kw["tie_word_embeddings"] = any(t["tie_word_embeddings"] for t in tied)
    if "in_chans" in vision:
      vision.setdefault("in_channels", vision["in_chans"])
    vkw = wio.config_fields(VisionConfig, vision, cls._VISION_KEYS + ("fullatt_block_indexes",), source,
                            required=False, prefix="vision_config.")
    vkw.update(wio.config_fields(VisionConfig, wio.config_section(vision, "rope_parameters", source), ("rope_theta",),
                                 source, required=False, prefix="vision_config.rope_parameters."))
    return cls(**kw, vision=VisionConfig(**vkw), **runtime)


_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                      fullatt_block_indexes=(7, 15, 23, 31))


def qwen2_5_vl_7b(**runtime) -> Qwen25VLConfig:
  """Qwen2.5-VL-7B-Instruct: 8,292,166,656 parameters."""
  return Qwen25VLConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, rms_norm_eps=1e-6,
                        vision=VisionConfig(**_QWEN25_VISION, out_hidden_size=3584), **runtime)


def qwen2_5_vl_32b(**runtime) -> Qwen25VLConfig:
  """Qwen2.5-VL-32B-Instruct: 33,448,292,352 parameters."""
  return Qwen25VLConfig(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, rms_norm_eps=1e-6,
                        vision=VisionConfig(**_QWEN25_VISION, out_hidden_size=5120), **runtime)


def tiny(**runtime) -> Qwen25VLConfig:
  """Test size. Real 14-pixel patches (pixel rows of 1176) but 56-pixel windows (2x2 merged patches), so
  images of a few hundred patches span several windows, partial ones included."""
  return Qwen25VLConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, mrope_section=(2, 3, 3),
                        image_token_id=152, vision_start_token_id=150, vision_end_token_id=151,
                        vision=VisionConfig(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                                            window_size=56, out_hidden_size=64, fullatt_block_indexes=(1,)),
                        **runtime)


# --------------------------------------------------------------------------------------------------
# Weight table, in the names checkpoints carry on disk: the hub's, which transformers 5 also writes
# (`visual.*`, `model.*` for the decoder, `lm_head.*`). Its in-memory names (`model.visual.*`,
# `model.language_model.*`) are renamed on read.
QWEN25VL_WEIGHTS = (
    wio.WeightRule(r"visual\.patch_embed\.kernel", r"visual.patch_embed.proj.weight", "conv3d"),
    wio.WeightRule(r"visual\.merger\.fc1\.kernel", r"visual.merger.mlp.0.weight", "linear"),
    wio.WeightRule(r"visual\.merger\.fc1\.bias", r"visual.merger.mlp.0.bias"),
    wio.WeightRule(r"visual\.merger\.fc2\.kernel", r"visual.merger.mlp.2.weight", "linear"),
    wio.WeightRule(r"visual\.merger\.fc2\.bias", r"visual.merger.mlp.2.bias"),
    wio.WeightRule(r"lm_head\.kernel", r"lm_head.weight", "linear"),
    wio.WeightRule(r"language_model\.(.*)\.(embedding|scale)", r"model.\1.weight"),
    wio.WeightRule(r"language_model\.(.*)\.kernel", r"model.\1.weight", "linear"),
    wio.WeightRule(r"language_model\.(.*)\.bias", r"model.\1.bias"),
    wio.WeightRule(r"(visual\..*)\.scale", r"\1.weight"),
    wio.WeightRule(r"(visual\..*)\.kernel", r"\1.weight", "linear"),
    wio.WeightRule(r"(visual\..*)\.bias", r"\1.bias"),
)


def hub_name(name: str) -> str:
  """transformers' in-memory names (`model.visual.*`, `model.language_model.*`) -> checkpoint names."""
  for prefix, hub in (("model.visual.", "visual."), ("model.language_model.", "model.")):
    if name.startswith(prefix):
      return hub + name[len(prefix):]
  return name


class _HubNames:
  """A SafetensorsReader seen under hub names, so one weight table reads both naming schemes."""

  def __init__(self, reader: wio.SafetensorsReader, source: str):
    self._reader = reader
    self._names: dict[str, str] = {}
    for name in reader.names():
      key = hub_name(name)
      if key in self._names:
        raise wio.CheckpointError(f"{source}: tensors {self._names[key]!r} and {name!r} both mean {key!r}")
      self._names[key] = name

  def names(self) -> list[str]:
    return list(self._names)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._reader.shape(self._names[name])

  def read(self, name: str) -> np.ndarray:
    return self._reader.read(self._names[name])


# --------------------------------------------------------------------------------------------------
# Host-side structure (NumPy): vision windows/frames, M-RoPE position ids, the prepared batch.
@flax.struct.dataclass
class Groups:
  """Block-diagonal attention as padded groups over a packed sequence of N tokens."""

  index: jax.Array  # (G, S) int32: the tokens of group g (padding repeats the group's first token)
  valid: jax.Array  # (G, S) bool
  inverse: jax.Array  # (N,) int32: token n sits at flat position inverse[n] of (G * S)


def groups_from_lengths(lengths) -> Groups:
  """Consecutive segments of the given (non-zero) lengths."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.size == 0 or (lengths <= 0).any():
    raise ValueError(f"segment lengths must be positive, got {lengths.tolist()}")
  starts = np.cumsum(lengths) - lengths
  size = int(lengths.max())
  offsets = np.arange(size)
  valid = offsets[None, :] < lengths[:, None]
  index = np.where(valid, starts[:, None] + offsets[None, :], starts[:, None])
  inverse = np.concatenate([g * size + np.arange(n) for g, n in enumerate(lengths)])
  return Groups(index.astype(np.int32), valid, inverse.astype(np.int32))


@flax.struct.dataclass
class VisionLayout:
  """transformers' window reordering and attention segments for one set of image grids."""

  window_index: jax.Array  # (N / merge_unit,) merged patches in window order
  reverse_index: jax.Array  # (N / merge_unit,) its inverse permutation
  rope_positions: jax.Array  # (N, 2) int32 (row, col) of each patch, window order
  windows: Groups  # windowed blocks: one group per (partial) window
  frames: Groups  # full-attention blocks: one group per image frame


def _check_grids(image_grid_thw, vcfg: VisionConfig) -> np.ndarray:
  grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  m = vcfg.spatial_merge_size
  bad = [g.tolist() for g in grids if (g <= 0).any() or g[1] % m or g[2] % m]
  if bad:
    raise ValueError(f"image_grid_thw rows {bad}: t, h, w must be positive and h, w multiples of "
                     f"spatial_merge_size {m}")
  return grids


def vision_layout(image_grid_thw, vcfg: VisionConfig) -> VisionLayout:
  """The packed-patch structure of transformers' vision tower (`get_vision_window_index` and friends)."""
  grids = _check_grids(image_grid_thw, vcfg)
  m, ws = vcfg.spatial_merge_size, vcfg.window_units
  window_index, window_lengths, positions, frame_lengths = [], [], [], []
  offset = 0
  for t, h, w in grids.tolist():
    lh, lw = h // m, w // m
    nh, nw = lh // ws + 1, lw // ws + 1  # transformers always pads (a whole empty row/column when exact)
    index = np.full((t, nh * ws, nw * ws), -1, np.int64)
    index[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    index = index.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws * ws)
    counts = (index >= 0).sum(-1).reshape(-1)
    window_lengths.append(counts[counts > 0] * vcfg.merge_unit)
    window_index.append(index[index >= 0] + offset)
    offset += t * lh * lw
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block_major = lambda a: a.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
    positions.append(np.tile(np.stack([block_major(rows), block_major(cols)], -1), (t, 1)))
    frame_lengths += [h * w] * t
  window_index = np.concatenate(window_index)
  patch_order = (window_index[:, None] * vcfg.merge_unit + np.arange(vcfg.merge_unit)).reshape(-1)
  return VisionLayout(
      window_index=window_index.astype(np.int32),
      reverse_index=np.argsort(window_index).astype(np.int32),
      rope_positions=np.concatenate(positions)[patch_order].astype(np.int32),
      windows=groups_from_lengths(np.concatenate(window_lengths)),
      frames=groups_from_lengths(frame_lengths))


def _image_runs(is_image: np.ndarray):
  """(is_image, start, end) for each run of equal values."""
  start = 0
  for value, run in itertools.groupby(is_image.tolist()):
    n = len(list(run))
    yield value, start, start + n
    start += n


def get_rope_index(input_ids, attention_mask, image_grid_thw, config: Qwen25VLConfig):
  """M-RoPE position ids as transformers' `Qwen2_5_VLModel.get_rope_index` computes them for images.

  Text tokens count up by one on all three axes; an image's tokens get (start + t, start + row,
  start + col) on its merged grid, and the text after it continues at start + max(h, w) / merge.
  Padding (attention_mask 0, either side) is skipped and gets position 0. Images are taken from
  `image_grid_thw` in the order of their `<|image_pad|>` runs over the batch, row by row; a run may
  hold several images back to back. Returns (position_ids (3, B, L) int32, rope_deltas (B, 1) int32).
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
  m = config.vision.spatial_merge_size
  grids = iter(_check_grids(np.zeros((0, 3)) if image_grid_thw is None else image_grid_thw, config.vision))
  position_ids = np.zeros((3,) + ids.shape, np.int64)
  deltas = np.zeros((ids.shape[0], 1), np.int64)
  for b in range(ids.shape[0]):
    tokens = ids[b][mask[b]]
    pieces, current = [], 0
    for is_image, start, end in _image_runs(tokens == config.image_token_id):
      if not is_image:
        pieces.append(np.broadcast_to(np.arange(end - start) + current, (3, end - start)))
        current += end - start
        continue
      while start < end:
        grid = next(grids, None)
        if grid is None:
          raise ValueError(f"row {b}: more <|image_pad|> tokens than image_grid_thw describes")
        t, h, w = int(grid[0]), int(grid[1]) // m, int(grid[2]) // m
        if start + t * h * w > end:
          raise ValueError(f"row {b}: an <|image_pad|> run of {end - start} tokens is shorter than image grid "
                           f"{grid.tolist()} needs ({t * h * w})")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + current)
        current += max(h, w)
        start += t * h * w
    row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    position_ids[:, b, mask[b]] = row
    deltas[b, 0] = (row.max() + 1 if row.size else 0) - len(tokens)
  if next(grids, None) is not None:
    raise ValueError("image_grid_thw describes more images than the <|image_pad|> tokens of input_ids hold")
  return position_ids.astype(np.int32), deltas.astype(np.int32)


@flax.struct.dataclass
class Batch:
  """Prepared model inputs: arrays only, shapes fixed by (B, L) and the image grids (one compile each)."""

  input_ids: jax.Array  # (B, L) int32
  attention_mask: jax.Array  # (B, L) bool
  position_ids: jax.Array  # (3, B, L) int32
  pixel_values: jax.Array | None  # (N, patch_dim), all images of the batch
  vision: VisionLayout | None


def prepare_batch(input_ids, attention_mask, pixel_values, image_grid_thw, config: Qwen25VLConfig) -> Batch:
  """Host step before the jitted forward: checks the inputs agree and builds the static structure."""
  ids = np.asarray(input_ids)
  if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
    raise ValueError(f"input_ids must lie in [0, vocab_size {config.vocab_size}), got {ids.min()}..{ids.max()}")
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  position_ids, _ = get_rope_index(ids, mask, image_grid_thw, config)
  n_tokens = int((ids == config.image_token_id).sum())
  if (ids[~mask] == config.image_token_id).any():
    raise ValueError("input_ids hold <|image_pad|> tokens at padded positions (attention_mask 0)")
  if image_grid_thw is None or len(np.asarray(image_grid_thw).reshape(-1, 3)) == 0:
    if pixel_values is not None or n_tokens:
      raise ValueError(f"pixel_values / {n_tokens} <|image_pad|> tokens given without image_grid_thw")
    return Batch(ids.astype(np.int32), mask, position_ids, None, None)
  vcfg = config.vision
  grids = _check_grids(image_grid_thw, vcfg)
  n_patches = int(grids.prod(-1).sum())
  if pixel_values is None or tuple(np.shape(pixel_values)) != (n_patches, vcfg.patch_dim):
    raise ValueError(f"pixel_values shape {None if pixel_values is None else np.shape(pixel_values)}: image_grid_thw "
                     f"{grids.tolist()} needs ({n_patches}, {vcfg.patch_dim})")
  return Batch(ids.astype(np.int32), mask, position_ids, pixel_values, vision_layout(grids, vcfg))


def place_batch(batch: Batch, mesh, rules=shd.DEFAULT_RULES) -> Batch:
  """Batch-major inputs split over the data-parallel mesh axes, the vision layout replicated (as is without a mesh)."""
  if mesh is None:
    return batch
  put = lambda x, axes=("batch",): jax.tree.map(lambda a: shd.put_rows(np.asarray(a), mesh, rules, axes), x)
  return Batch(input_ids=put(batch.input_ids), attention_mask=put(batch.attention_mask),
               position_ids=put(batch.position_ids, (None, "batch")), pixel_values=put(batch.pixel_values),
               vision=put(batch.vision, ()))


def abstract_batch(cfg: Qwen25VLConfig, image_cfg, rows: int, size: tuple[int, int], images: int, text: int,
                   length: int, mesh, rules=shd.DEFAULT_RULES, *, left_pad: bool) -> Batch:
  """An abstract `Batch` placed as `place_batch` places it, for ahead-of-time compilation: `rows` rows of `length`
  tokens, `text` tokens (vision markers included) and `images` images of `size` pixels (already resized by the
  processor whose `ImageProcessorConfig` is `image_cfg`) each, padded on the left or the right. Only the token ids
  and the vision layout are made on the host; pixel values are abstract."""
  if (image_cfg.patch_size, image_cfg.merge_size, image_cfg.temporal_patch_size) != (
      cfg.vision.patch_size, cfg.vision.spatial_merge_size, cfg.vision.temporal_patch_size):
    raise ValueError("the Qwen2.5-VL's preprocessor_config.json and config.json disagree on the patch sizes")
  grid = (1, size[0] // image_cfg.patch_size, size[1] // image_cfg.patch_size)
  filler = cfg.image_token_id + 1 if cfg.image_token_id + 1 < cfg.vocab_size else 0
  image = [cfg.vision_start_token_id] + [cfg.image_token_id] * image_cfg.num_tokens(grid) + [cfg.vision_end_token_id]
  row = [filler] * (text - 2 * images) + image * images
  if len(row) > length:
    raise ValueError(f"{len(row)} tokens ({images} image(s) of {size[0]}x{size[1]} pixels and text) exceed {length}")
  at = slice(length - len(row), length) if left_pad else slice(0, len(row))
  ids = np.zeros((rows, length), np.int32)
  ids[:, at] = row
  mask = np.zeros((rows, length), bool)
  mask[:, at] = True
  patches = jax.ShapeDtypeStruct((images * rows * math.prod(grid), cfg.vision.patch_dim), jnp.float32)
  host = prepare_batch(ids, mask, patches, np.asarray([grid] * (images * rows)), cfg)
  rows_of = lambda x, axes=("batch",): jax.tree.map(
      lambda a: shd.abstract_rows(np.shape(a), a.dtype, mesh, rules, axes), x)
  return rows_of(host, ()).replace(input_ids=rows_of(host.input_ids), attention_mask=rows_of(host.attention_mask),
                                   position_ids=rows_of(host.position_ids, (None, "batch")),
                                   pixel_values=rows_of(host.pixel_values))


# --------------------------------------------------------------------------------------------------
def rotate_half_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin in float32; halves (not pairs) rotate together. cos/sin lack the head axis."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  cos, sin = cos[..., None, :], sin[..., None, :]
  return (x32 * cos + rotated * sin).astype(x.dtype)


def _inv_freq(theta: float, dim: int) -> np.ndarray:
  return (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)


def vision_rope(positions: jax.Array, vcfg: VisionConfig) -> tuple[jax.Array, jax.Array]:
  """(N, head_dim) cos/sin: frequencies of half the head driven by the row, then by the column, twice."""
  freqs = positions.astype(jnp.float32)[..., None] * _inv_freq(vcfg.rope_theta, vcfg.head_dim // 2)
  angles = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def mrope(position_ids: jax.Array, cfg: Qwen25VLConfig) -> tuple[jax.Array, jax.Array]:
  """(B, L, head_dim) cos/sin: frequency pairs in mrope_section chunks follow the t, h, w positions in turn."""
  freqs = position_ids.astype(jnp.float32)[..., None] * _inv_freq(cfg.rope_theta, cfg.head_dim)  # (3, B, L, hd/2)
  bounds = np.cumsum((0,) + tuple(cfg.mrope_section))
  angles = jnp.concatenate([freqs[i % 3, ..., bounds[i]:bounds[i + 1]] for i in range(len(cfg.mrope_section))], -1)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def grouped_attention(q, k, v, groups: Groups, implementation: str) -> jax.Array:
  """Block-diagonal attention of packed (N, H, D) tokens: gather into groups, attend, scatter back."""
  n, heads, dim = q.shape
  gather = lambda x: shd.constrain(x[groups.index], ("batch", "seq", "heads", "kv"))
  out = attention(gather(q), gather(k), gather(v), kv_valid=groups.valid, implementation=implementation,
                  where="vision attention")
  return out.reshape(-1, heads, dim)[groups.inverse]


class _Factory:
  """Layers with the config's dtypes."""

  def __init__(self, cfg: Qwen25VLConfig, rngs: nnx.Rngs):
    self.cfg, self.rngs = cfg, rngs
    self.dtype, self.param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

  def dense(self, n_in: int, n_out: int, axes, use_bias: bool = True) -> Dense:
    return Dense(n_in, n_out, axes=axes, rngs=self.rngs, use_bias=use_bias, dtype=self.dtype,
                 param_dtype=self.param_dtype)

  def rms(self, dim: int, eps: float) -> RMSNorm:
    return RMSNorm(dim, eps=eps, axes=("embed",), param_dtype=self.param_dtype, dtype=self.dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)); biased in the vision tower, not in the decoder."""

  def __init__(self, f: _Factory, dim: int, hidden: int, use_bias: bool):
    self.gate_proj = f.dense(dim, hidden, ("embed", "mlp"), use_bias)
    self.up_proj = f.dense(dim, hidden, ("embed", "mlp"), use_bias)
    self.down_proj = f.dense(hidden, dim, ("mlp", "embed"), use_bias)

  def __call__(self, x, axes):
    h = shd.constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), axes + ("mlp",))
    return self.down_proj(h)


# --------------------------------------------------------------------------------------------------
# Vision tower. The packed patch axis (all images of the batch) plays the batch role for sharding.
_PATCHES = ("batch", "act_embed")


class PatchEmbed(nnx.Module):
  """The 3-D convolution over (temporal patch, patch, patch) as one matmul on the flattened pixel rows."""

  def __init__(self, f: _Factory):
    v = f.cfg.vision
    shape = (v.temporal_patch_size, v.patch_size, v.patch_size, v.in_channels, v.hidden_size)
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(f.rngs.params(), shape, f.param_dtype),
                            logical_axes=(None, None, None, None, "embed"))
    self.dtype = f.dtype

  def __call__(self, pixels):  # rows are flattened as (channel, t, y, x)
    kernel = self.kernel[...].transpose(3, 0, 1, 2, 4).reshape(pixels.shape[-1], -1)
    return jnp.dot(pixels.astype(self.dtype), kernel.astype(self.dtype))


class VisionAttention(nnx.Module):

  def __init__(self, f: _Factory):
    v = f.cfg.vision
    self.vcfg, self.impl = v, f.cfg.attention_impl
    self.qkv = f.dense(v.hidden_size, 3 * v.hidden_size, ("embed", None))  # fused: q, k, v blocks
    self.proj = f.dense(v.hidden_size, v.hidden_size, (None, "embed"))

  def __call__(self, x, rope, groups: Groups):
    v = self.vcfg
    q, k, val = jnp.moveaxis(self.qkv(x).reshape(x.shape[0], 3, v.num_heads, v.head_dim), 1, 0)
    q, k = rotate_half_rope(q, *rope), rotate_half_rope(k, *rope)
    out = grouped_attention(q, k, val, groups, self.impl)
    return self.proj(out.reshape(x.shape[0], -1))


class VisionBlock(nnx.Module):

  def __init__(self, f: _Factory):
    v = f.cfg.vision
    self.norm1, self.norm2 = f.rms(v.hidden_size, 1e-6), f.rms(v.hidden_size, 1e-6)
    self.attn = VisionAttention(f)
    self.mlp = SwiGLU(f, v.hidden_size, v.intermediate_size, use_bias=True)

  def __call__(self, x, rope, groups: Groups):
    x = x + self.attn(self.norm1(x), rope, groups)
    x = x + self.mlp(self.norm2(x), ("batch",))
    return shd.constrain(x, _PATCHES)


class PatchMerger(nnx.Module):
  """RMSNorm, then each merge_unit consecutive patches concatenated -> Linear, GELU (erf), Linear."""

  def __init__(self, f: _Factory):
    v = f.cfg.vision
    width = v.hidden_size * v.merge_unit
    self.ln_q = f.rms(v.hidden_size, 1e-6)
    self.fc1 = f.dense(width, width, ("embed", "mlp"))
    self.fc2 = f.dense(width, v.out_hidden_size, ("mlp", "embed"))

  def __call__(self, x):
    h = self.ln_q(x).reshape(-1, self.fc1.kernel.shape[0])
    return self.fc2(jax.nn.gelu(self.fc1(h), approximate=False))


class VisionTransformer(nnx.Module):
  """transformers' `Qwen2_5_VisionTransformerPretrainedModel`: (N, patch_dim) pixels -> (N / 4, out) features."""

  def __init__(self, f: _Factory):
    v = f.cfg.vision
    self.cfg = f.cfg
    self.patch_embed = PatchEmbed(f)
    self.blocks = StackedBlocks([VisionBlock(f) for _ in range(v.depth)], "visual.blocks")
    self.merger = PatchMerger(f)

  def __call__(self, pixel_values, layout: VisionLayout):
    v = self.cfg.vision
    x = self.patch_embed(pixel_values)
    x = x.reshape(-1, v.merge_unit, x.shape[-1])[layout.window_index].reshape(x.shape)  # window order
    x = shd.constrain(x, _PATCHES)
    rope = vision_rope(layout.rope_positions, v)
    full = jnp.asarray([i in v.fullatt_block_indexes for i in range(v.depth)])

    def step(block, x, i):  # one scanned body: a block attends within frames or within windows
      return jax.lax.cond(full[i], lambda x: block(x, rope, layout.frames), lambda x: block(x, rope, layout.windows), x)

    x = self.blocks.scan(step, x, remat_policy(self.cfg.remat))
    return shd.constrain(self.merger(x)[layout.reverse_index], _PATCHES)


# --------------------------------------------------------------------------------------------------
# Qwen2 decoder.
_HIDDEN = ("batch", "seq", "act_embed")
_CACHE = ("batch", None, "seq", "heads", "kv")


@flax.struct.dataclass
class KVCache:
  """Keys (after rope) and values of every decoder layer, kv heads not repeated, preallocated in the compute dtype
  for a whole generation so each step writes in place; positions [0, length) are filled (the same in every row)."""

  keys: jax.Array  # (B, layers, T, kv_heads, head_dim)
  values: jax.Array
  length: jax.Array  # () int32

  @classmethod
  def empty(cls, batch: int, size: int, cfg: Qwen25VLConfig) -> "KVCache":
    """Length 0 as a host constant: the prefill's causal offset is then known when tracing (the splash kernel
    needs it static); inside a scan it becomes traced, one token at a time."""
    shape = (batch, cfg.num_hidden_layers, size, cfg.num_key_value_heads, cfg.head_dim)
    zeros = shd.constrain(jnp.zeros(shape, cfg.dtype), _CACHE)
    return cls(zeros, zeros, np.zeros((), np.int32))

  def write(self, layer, k: jax.Array, v: jax.Array) -> "KVCache":
    """The (B, n, kv_heads, head_dim) keys and values of `layer` at positions [length, length + n)."""
    at = (0, layer, self.length, 0, 0)
    put = lambda cache, x: jax.lax.dynamic_update_slice(cache, x[:, None].astype(cache.dtype), at)
    return self.replace(keys=put(self.keys, k), values=put(self.values, v))


class DecoderAttention(nnx.Module):
  """GQA with q/k/v biases; kv heads repeated as transformers' repeat_kv (head h uses kv head h // groups).
  With a cache, the new tokens' keys and values are written into it and the queries attend over all its positions."""

  def __init__(self, f: _Factory):
    c = f.cfg
    self.cfg = c
    self.q_proj = f.dense(c.hidden_size, c.num_attention_heads * c.head_dim, ("embed", "heads"))
    self.k_proj = f.dense(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "heads"))
    self.v_proj = f.dense(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "heads"))
    self.o_proj = f.dense(c.num_attention_heads * c.head_dim, c.hidden_size, ("heads", "embed"), use_bias=False)

  def __call__(self, x, rope, kv_valid, start, cache: KVCache | None, layer):
    c = self.cfg
    heads = lambda y: shd.constrain(y.reshape(y.shape[:2] + (-1, c.head_dim)), ("batch", "seq", "heads", "kv"))
    q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
    q, k = rotate_half_rope(q, *rope), rotate_half_rope(k, *rope)
    if cache is not None:
      cache = cache.write(layer, k, v)
      k, v = cache.keys[:, layer], cache.values[:, layer]
    groups = c.num_attention_heads // c.num_key_value_heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    out = attention(q, k, v, kv_valid=kv_valid, causal=True, q_offset=start, implementation=c.attention_impl,
                    where="decoder attention")
    return self.o_proj(out.reshape(out.shape[:2] + (-1,))), cache


class DecoderLayer(nnx.Module):

  def __init__(self, f: _Factory):
    c = f.cfg
    self.input_layernorm = f.rms(c.hidden_size, c.rms_norm_eps)
    self.self_attn = DecoderAttention(f)
    self.post_attention_layernorm = f.rms(c.hidden_size, c.rms_norm_eps)
    self.mlp = SwiGLU(f, c.hidden_size, c.intermediate_size, use_bias=False)

  def __call__(self, x, rope, kv_valid, start, cache: KVCache | None, layer):
    attended, cache = self.self_attn(self.input_layernorm(x), rope, kv_valid, start, cache, layer)
    x = x + attended
    x = x + self.mlp(self.post_attention_layernorm(x), ("batch", "seq"))
    return shd.constrain(x, _HIDDEN), cache


class TextModel(nnx.Module):
  """transformers' `Qwen2_5_VLTextModel` on given input embeddings: decoder layers and the final norm."""

  def __init__(self, f: _Factory):
    c = f.cfg
    self.cfg = c
    self.embed_tokens = Embed(c.vocab_size, c.hidden_size, axes=("vocab", "embed"), rngs=f.rngs,
                              param_dtype=f.param_dtype, dtype=f.dtype)
    self.layers = StackedBlocks([DecoderLayer(f) for _ in range(c.num_hidden_layers)], "language_model.layers")
    self.norm = f.rms(c.hidden_size, c.rms_norm_eps)

  def __call__(self, x, attention_mask, position_ids, cache: KVCache | None = None):
    """(hidden after the final norm, cache). Without a cache, x (B, L) attends to itself and `attention_mask`
    (B, L) marks its valid tokens; with one, x holds the tokens at cache positions [length, length + n),
    written into it, and `attention_mask` (B, T) marks the valid positions of the whole cache."""
    start = 0 if cache is None else cache.length  # taken before the scan, which would trace it
    kv_valid = attention_mask.astype(bool)
    rope = mrope(position_ids, self.cfg)
    x = shd.constrain(x, _HIDDEN)
    step = lambda layer, carry, i: layer(carry[0], rope, kv_valid, start, carry[1], i)
    x, cache = self.layers.scan(step, (x, cache), remat_policy(self.cfg.remat))
    if cache is not None:
      cache = cache.replace(length=cache.length + x.shape[1])
    return self.norm(x), cache


def scatter_image_features(embeds: jax.Array, is_image: jax.Array, features: jax.Array) -> jax.Array:
  """transformers' masked_scatter: the k-th image token of the batch (row-major) gets feature row k."""
  order = jnp.cumsum(is_image.reshape(-1)) - 1
  gathered = features[jnp.clip(order, 0, features.shape[0] - 1)].reshape(embeds.shape)
  return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


class Qwen25VL(nnx.Module):
  """Image-text prefill. Call with host arrays (`__call__`, `logits_at`), or jit `hidden_states` /
  `logits_at_batch` on a `prepare_batch` result. Logits come out in float32 (float32 accumulation)."""

  def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
    f = _Factory(cfg, rngs)
    self.cfg = cfg
    self.visual = VisionTransformer(f)
    self.language_model = TextModel(f)
    self.lm_head = None if cfg.tie_word_embeddings else f.dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"),
                                                                use_bias=False)

  def embed(self, batch: Batch) -> jax.Array:
    """(B, L, hidden) input embeddings, the image tokens' replaced by the vision tower's features."""
    embeds = self.language_model.embed_tokens(batch.input_ids)
    if batch.vision is not None:
      features = self.visual(batch.pixel_values, batch.vision)
      embeds = scatter_image_features(embeds, batch.input_ids == self.cfg.image_token_id, features)
    return embeds

  def hidden_states(self, batch: Batch) -> jax.Array:
    """(B, L, hidden) after the final norm."""
    return self.language_model(self.embed(batch), batch.attention_mask, batch.position_ids)[0]

  def project(self, hidden: jax.Array) -> jax.Array:
    """lm_head (or the tied embedding) in the compute dtype, accumulated and returned in float32."""
    dt = jnp.dtype(self.cfg.dtype)
    if self.lm_head is None:
      weight = self.language_model.embed_tokens.embedding[...].T
    else:
      weight = self.lm_head.kernel[...]
    logits = jnp.dot(hidden.astype(dt), weight.astype(dt), preferred_element_type=jnp.float32)
    return shd.constrain(logits, ("batch", "seq", "vocab"))

  def logits_at_batch(self, batch: Batch, positions: jax.Array) -> jax.Array:
    """(B, P, V) logits at `positions` (B, P); only those hidden states go through the head."""
    hidden = self.hidden_states(batch)
    picked = jnp.take_along_axis(hidden, jnp.asarray(positions)[..., None].astype(jnp.int32), axis=1)
    return self.project(picked)

  def __call__(self, input_ids, attention_mask, pixel_values, image_grid_thw) -> jax.Array:
    """(B, L, V) logits; for small inputs (the reward uses `logits_at`)."""
    return self.project(self.hidden_states(prepare_batch(input_ids, attention_mask, pixel_values, image_grid_thw,
                                                         self.cfg)))

  def logits_at(self, input_ids, attention_mask, pixel_values, image_grid_thw, positions) -> jax.Array:
    positions = np.asarray(positions)
    ids = np.asarray(input_ids)
    if positions.ndim != 2 or positions.shape[0] != ids.shape[0]:
      raise ValueError(f"positions must be (batch, P) with batch {ids.shape[0]}, got shape {positions.shape}")
    if positions.size and (positions.min() < 0 or positions.max() >= ids.shape[1]):
      raise ValueError(f"positions must lie in [0, {ids.shape[1]}), got {positions.min()}..{positions.max()}")
    return self.logits_at_batch(prepare_batch(ids, attention_mask, pixel_values, image_grid_thw, self.cfg), positions)


# --------------------------------------------------------------------------------------------------
def load_qwen2_5_vl(folder: str, *, dtype: str = "float32", param_dtype: str | None = None, mesh=None,
                    rules=shd.DEFAULT_RULES, attention_impl: str = "auto", remat: str = "none") -> Qwen25VL:
  """Read a transformers Qwen2.5-VL folder (config.json + safetensors, sharded or not; hub or transformers-5
  tensor names), tensor by tensor, into its target sharding."""
  cfg = Qwen25VLConfig.from_hf_config(wio.read_config(folder), source=os.path.join(folder, "config.json"),
                                      dtype=dtype, param_dtype=param_dtype or dtype, attention_impl=attention_impl,
                                      remat=remat)
  abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  reader = _HubNames(wio.SafetensorsReader.from_folder(folder), folder)
  tied = (lambda name: name == "lm_head.weight") if cfg.tie_word_embeddings else None
  state = wio.load_state(abstract_state, reader, QWEN25VL_WEIGHTS, source=folder, mesh=mesh, rules=rules,
                         allow_unused=tied)
  return nnx.merge(graphdef, state)
