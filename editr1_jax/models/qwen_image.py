"""Qwen-Image transformer (the policy network of Qwen-Image-Edit-2509), equal to diffusers'
`QwenImageTransformer2DModel`.

Sixty double-stream blocks (FLUX's block math under Qwen's names, `flux.double_stream`), text padding masked out
of the keys, and a 3-axis rotary embedding: each image of a row gets frame index = its place in the row (0 the
target, then the references), rows and columns centred on the image middle, and text tokens continue on the
diagonal after the largest image half-extent. Image tokens are [target | reference 1 | ...], each row-major; the
output covers all of them and the caller keeps the target part. Timestep, rotary math, norm statistics and
softmax run in float32 whatever the compute dtype.

Positions: `img_shapes` (diffusers' per-row list of (frame, height, width) triples, every row the same) is host
data; a jitted step passes `positions=rope_positions(img_shapes, text_length)` instead, two float32 arrays that
travel as a pytree like any other condition.

`zero_cond_t` (Qwen-Image-Edit-2511): the condition images' tokens are modulated as if at t = 0. Every block's
image-stream shift / scale / gate come from the embedding of t for the target's tokens and from the embedding of
t = 0 for every condition image's tokens (diffusers doubles the timestep batch to [t, 0] and selects per token by
its `modulate_index`); the text stream and the output norm keep t.
"""

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.layers import AdapterRows, LoraSpec, RMSNorm, split_adapters
from editr1_jax.models import flux

DEFAULT_LORA_TARGETS = flux.DEFAULT_LORA_TARGETS  # the same eight attention projections
REMAT_POLICIES = flux.REMAT_POLICIES  # "flux" keeps q/k/v and the attention output (flux.Attention names them)
# Features of diffusers' model we do not port: each must stay false (the last two are Qwen-Image-Layered's).
_UNPORTED = ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope")


@dataclasses.dataclass(frozen=True)
class QwenImageConfig(wio.DiffusersConfig):
  patch_size: int = 2
  in_channels: int = 64
  out_channels: int | None = 16
  num_layers: int = 60
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 3584
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  guidance_embeds: bool = False
  zero_cond_t: bool = False
  use_additional_t_cond: bool = False
  use_layer3d_rope: bool = False
  rope_theta: float = 10000.0  # fixed in diffusers, not a config key
  # runtime, not architecture
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of REMAT_POLICIES
  attention_impl: str = "auto"  # one of attention.IMPLEMENTATIONS (editr1_jax/attention.py)
  scan_blocks: bool = True  # the blocks stacked and run by one lax.scan where they are alike (flux.block_list)
  lora: LoraSpec | None = None

  def __post_init__(self):
    flux.attn_lib.check_implementation(self.attention_impl)
    for name in _UNPORTED:
      if getattr(self, name):
        raise ValueError(f"{name}: true is not supported by this port of QwenImageTransformer2DModel")
    if len(self.axes_dims_rope) != 3 or any(d <= 0 or d % 2 for d in self.axes_dims_rope):
      raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be three positive even sizes (frame, row, col)")
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                       f"{self.attention_head_dim}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def out_dim(self) -> int:
    return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

  _CLASS_NAME = "QwenImageTransformer2DModel"
  _DIFFUSERS_KEYS = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "axes_dims_rope", "zero_cond_t") + _UNPORTED


def edit_2509(**runtime) -> QwenImageConfig:
  """Qwen-Image-Edit-2509's transformer (the hub config.json = diffusers' defaults): 20,430,401,088 parameters."""
  return QwenImageConfig(**runtime)


def edit_2511(**runtime) -> QwenImageConfig:
  """Qwen-Image-Edit-2511's transformer: 2509's architecture and tensors (20,430,401,088 parameters, the same names
  and shapes) with zero_cond_t."""
  return QwenImageConfig(zero_cond_t=True, **runtime)


def tiny(**runtime) -> QwenImageConfig:
  return QwenImageConfig(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=24, axes_dims_rope=(4, 6, 6), **runtime)


# --------------------------------------------------------------------------------------------------
# Weight tables: the modulation projections sit in an nn.Sequential (`img_mod.1`); the rest is FLUX's naming.
QWEN_IMAGE_WEIGHTS = (
    wio.WeightRule(r"(.*_mod)\.linear\.kernel", r"\1.1.weight", "linear"),
    wio.WeightRule(r"(.*_mod)\.linear\.bias", r"\1.1.bias"),
) + flux.FLUX_WEIGHTS

QWEN_IMAGE_LORA_WEIGHTS = (
    wio.WeightRule(r"(.*_mod)\.linear\.lora_a", r"\1.1.lora_A.weight", "lora"),
    wio.WeightRule(r"(.*_mod)\.linear\.lora_b", r"\1.1.lora_B.weight", "lora"),
) + flux.FLUX_LORA_WEIGHTS
LORA_PREFIXES = flux.LORA_PREFIXES


# --------------------------------------------------------------------------------------------------
def _triple(entry, where: str) -> tuple[int, int, int]:
  if (isinstance(entry, (list, tuple)) and len(entry) == 3
      and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in entry)):
    return tuple(int(v) for v in entry)
  raise ValueError(f"{where} must be a (frame, height, width) triple of positive ints, got {entry!r:.80}")


def image_shapes(img_shapes, batch: int | None = None) -> tuple[tuple[int, int, int], ...]:
  """The one row's (frame, height, width) per image from diffusers' per-row `img_shapes` (a row is a list of
  triples or one triple). Every row must be the same: positions are shared by the batch (the reference, too,
  uses the first row's for all)."""
  if not isinstance(img_shapes, (list, tuple)) or not img_shapes:
    raise ValueError(f"img_shapes must be a non-empty list with one entry per batch row, got {img_shapes!r:.80}")
  rows = []
  for i, row in enumerate(img_shapes):
    single = isinstance(row, (list, tuple)) and len(row) == 3 and not isinstance(row[0], (list, tuple))
    if single:
      rows.append((_triple(row, f"img_shapes[{i}]"),))
    elif isinstance(row, (list, tuple)) and row:
      rows.append(tuple(_triple(e, f"img_shapes[{i}][{j}]") for j, e in enumerate(row)))
    else:
      raise ValueError(f"img_shapes[{i}] must be a non-empty list of (frame, height, width), got {row!r:.80}")
  if batch is not None and len(rows) != batch:
    raise ValueError(f"img_shapes has {len(rows)} rows, the batch has {batch}")
  if any(r != rows[0] for r in rows):
    raise ValueError(f"img_shapes: every row must have the same images, got {sorted(set(rows))}")
  return rows[0]


def rope_positions(img_shapes, text_length: int, *, batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(image positions (L_img, 3), text positions (L_txt, 3)), float32 (frame, row, col): the reference's rotary
  table lookups as positions. Rows and columns run from -(n - n // 2) to n // 2 - 1; text token j sits at
  (m + j, m + j, m + j) with m the largest n // 2 over all images."""
  shapes = image_shapes(img_shapes, batch)
  grids = []
  for index, (frames, height, width) in enumerate(shapes):
    axes = (index + np.arange(frames), np.arange(height) - (height - height // 2),
            np.arange(width) - (width - width // 2))
    grids.append(np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3))
  start = max(max(h // 2, w // 2) for _, h, w in shapes)
  text = np.repeat(start + np.arange(text_length)[:, None], 3, axis=1)
  return np.concatenate(grids).astype(np.float32), text.astype(np.float32)


def _check_inputs(cfg: QwenImageConfig, hidden_states, encoder_hidden_states, mask, timestep) -> None:
  """Shapes of the array inputs, before any work: one error naming the argument."""
  if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
    raise ValueError(f"hidden_states must be (batch, image tokens, {cfg.in_channels}), got {hidden_states.shape}")
  batch, n_img = hidden_states.shape[:2]
  if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[::2] != (batch, cfg.joint_attention_dim):
    raise ValueError(f"encoder_hidden_states must be ({batch}, text tokens, {cfg.joint_attention_dim}), "
                     f"got {encoder_hidden_states.shape}")
  n_txt = encoder_hidden_states.shape[1]
  if mask is not None and tuple(mask.shape) != (batch, n_txt):
    raise ValueError(f"encoder_hidden_states_mask must be ({batch}, {n_txt}), got {tuple(mask.shape)}")
  if np.ndim(timestep) > 1 or np.size(timestep) not in (1, batch):
    raise ValueError(f"timestep must be a scalar or ({batch},), got shape {np.shape(timestep)}")


def _check_positions(positions, batch: int, n_img: int, n_txt: int) -> None:
  if not (isinstance(positions, (tuple, list)) and len(positions) == 2):
    raise ValueError("positions must be (image positions, text positions), as rope_positions returns")
  for name, pos, n in (("image", positions[0], n_img), ("text", positions[1], n_txt)):
    if np.ndim(pos) not in (2, 3) or tuple(np.shape(pos)[-2:]) != (n, 3) or (np.ndim(pos) == 3 and len(pos) != batch):
      raise ValueError(f"positions: {name} positions must be ({n}, 3) or ({batch}, {n}, 3) for these inputs, "
                       f"got {tuple(np.shape(pos))}")


class TimestepProjection(nnx.Module):
  """diffusers' QwenTimestepProjEmbeddings: sinusoids of t * 1000, then linear_1 -> SiLU -> linear_2."""

  def __init__(self, f: flux._Factory):
    self.timestep_embedder = flux.MLPEmbedder(f, "time_text_embed.timestep_embedder", 256, f.cfg.inner_dim)

  def __call__(self, t, adapters=None):
    return self.timestep_embedder(flux.timestep_embedding(t, scale=1000.0), adapters)


class QwenImageTransformerBlock(nnx.Module):
  """Separate image / text weights (modulation, feed-forward), one joint attention over [text | image]."""

  def __init__(self, f: flux._Factory, name: str):
    self.dtype = f.dtype
    self.img_mod = flux.AdaNorm(f, f"{name}.img_mod", 6, layer="1")
    self.txt_mod = flux.AdaNorm(f, f"{name}.txt_mod", 6, layer="1")
    self.attn = flux.Attention(f, f"{name}.attn", context=True, output=True)
    self.img_mlp = flux.FeedForward(f, f"{name}.img_mlp")
    self.txt_mlp = flux.FeedForward(f, f"{name}.txt_mlp")

  def __call__(self, x, context, temb, rope, adapters=None, kv_valid=None, zero_cond=None):
    """`zero_cond`: (the embedding of t = 0, (B or 1, L_img) bool marking condition-image tokens) with zero_cond_t:
    those tokens take the image modulation of t = 0, the target's that of `temb`."""
    image_mods = None
    if zero_cond is not None:
      temb_zero, is_cond = zero_cond
      image_mods = [jnp.where(is_cond[..., None], zero[:, None], now[:, None])
                    for now, zero in zip(self.img_mod(temb, adapters), self.img_mod(temb_zero, adapters))]
    return flux.double_stream(self.attn, (self.img_mod, self.img_mlp), (self.txt_mod, self.txt_mlp), x, context,
                              temb, rope, self.dtype, adapters, kv_valid, image_mods)


class QwenImageTransformer(nnx.Module):

  def __init__(self, cfg: QwenImageConfig, *, rngs: nnx.Rngs):
    f = flux._Factory(cfg, rngs)
    dim = cfg.inner_dim
    self.cfg = cfg
    self.time_text_embed = TimestepProjection(f)
    self.txt_norm = RMSNorm(cfg.joint_attention_dim, eps=1e-6, axes=(None,), param_dtype=f.param_dtype,
                            dtype=f.dtype)
    self.img_in = f.dense("img_in", cfg.in_channels, dim, (None, "embed"))
    self.txt_in = f.dense("txt_in", cfg.joint_attention_dim, dim, (None, "embed"))
    self.transformer_blocks = flux.block_list(
        [QwenImageTransformerBlock(f, f"transformer_blocks.{i}") for i in range(cfg.num_layers)], "transformer_blocks",
        cfg.scan_blocks)
    self.norm_out = flux.AdaNorm(f, "norm_out", 2)
    self.proj_out = f.dense("proj_out", dim, cfg.out_dim, ("embed", None))
    if cfg.lora is not None:
      check_lora_targets(cfg.lora.targets, "lora.targets", layers=adapter_layers(self))

  def __call__(self, *, hidden_states, encoder_hidden_states, timestep, encoder_hidden_states_mask=None,
               img_shapes=None, positions=None, target_tokens: int | None = None,
               adapters: AdapterRows | None = None) -> jax.Array:
    """Mirrors diffusers' forward; returns (B, L_img, patch^2 * out_channels) for all image tokens given.

    Exactly one of `img_shapes` (diffusers' per-row (frame, height, width) lists, all rows equal) or
    `positions` (`rope_positions`' (image, text) arrays, (L, 3) shared or (B, L, 3) per row) places the tokens.
    `timestep` is the pipeline's t in [0, 1] (scalar or (B,)); `encoder_hidden_states_mask` (B, L_txt) is
    nonzero for real text tokens (None: all are). `target_tokens`: how many leading image tokens are the target's
    (with zero_cond_t, the rest are condition images'); read from `img_shapes` when given, needed with `positions`.
    """
    cfg = self.cfg
    mask = encoder_hidden_states_mask
    if (img_shapes is None) == (positions is None):
      raise ValueError("pass exactly one of img_shapes and positions")
    _check_inputs(cfg, hidden_states, encoder_hidden_states, mask, timestep)
    (batch, n_img), n_txt = hidden_states.shape[:2], encoder_hidden_states.shape[1]
    if img_shapes is not None:
      positions = rope_positions(img_shapes, n_txt, batch=batch)
      if len(positions[0]) != n_img:
        raise ValueError(f"img_shapes: the images hold {len(positions[0])} tokens, hidden_states has {n_img}")
      target = int(np.prod(image_shapes(img_shapes, batch)[0]))
      if target_tokens not in (None, target):
        raise ValueError(f"target_tokens {target_tokens}: img_shapes' first image holds {target} tokens")
      target_tokens = target
    _check_positions(positions, batch, n_img, n_txt)
    if cfg.zero_cond_t and not (isinstance(target_tokens, int) and 0 < target_tokens <= n_img):
      raise ValueError(f"zero_cond_t: target_tokens must be the target image's token count (1..{n_img}), got "
                       f"{target_tokens!r}")

    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (batch,))
    temb = self.time_text_embed(t, adapters)
    x = shd.constrain(self.img_in(hidden_states, adapters), ("batch", "seq", "act_embed"))
    context = shd.constrain(self.txt_in(self.txt_norm(encoder_hidden_states), adapters),
                            ("batch", "seq", "act_embed"))
    img_pos, txt_pos = (jnp.asarray(p, jnp.float32) for p in positions)
    if img_pos.ndim != txt_pos.ndim:  # one shared, one per row
      img_pos, txt_pos = (jnp.broadcast_to(p, (batch,) + p.shape[-2:]) for p in (img_pos, txt_pos))
    rope = flux.rope_tables(jnp.concatenate([txt_pos, img_pos], axis=-2), cfg.axes_dims_rope, cfg.rope_theta)
    if mask is not None:  # keys: the text tokens the mask keeps, every image token
      mask = jnp.concatenate([jnp.asarray(mask) != 0, jnp.ones((batch, n_img), bool)], axis=1)

    zero_cond = None
    if cfg.zero_cond_t:
      zero_cond = (self.time_text_embed(jnp.zeros_like(t), adapters), (jnp.arange(n_img) >= target_tokens)[None])
    context, x = flux.run_blocks(self.transformer_blocks, cfg.remat, x, context, temb, rope, adapters, mask,
                                 zero_cond)
    scale, shift = self.norm_out(temb, adapters)
    return self.proj_out(flux._modulate(x, shift, scale, jnp.dtype(cfg.dtype)), adapters)


# --------------------------------------------------------------------------------------------------
def adapter_layers(model: QwenImageTransformer) -> list[str]:
  """The diffusers names of the model's Dense layers: what peft target keys are matched against."""
  return flux.adapter_layers(model, QWEN_IMAGE_WEIGHTS)


@functools.cache
def _edit_2509_adapter_layers() -> tuple[str, ...]:
  full = edit_2509()
  one = nnx.eval_shape(lambda: QwenImageTransformer(full.replace(num_layers=1), rngs=nnx.Rngs(0)))
  return flux.repeat_blocks(adapter_layers(one), {"transformer_blocks": full.num_layers})


def check_lora_targets(targets: Sequence[str], where: str, *, layers: Sequence[str] | None = None) -> None:
  """Every peft target key must match a layer (of `layers`, Qwen-Image-Edit-2509's by default), before any
  weight is read: a key that matches none would train nothing."""
  flux.check_lora_targets(targets, where, layers=_edit_2509_adapter_layers() if layers is None else layers,
                          model="Qwen-Image")


split_params = split_adapters  # (graphdef, adapter state, base state)
init_adapters = flux.init_adapters  # fresh adapters (A Gaussian, B zero) in their sharding


def load_lora_weights(abstract_adapters, path: str, scale: float, *, mesh=None, rules=shd.DEFAULT_RULES):
  """A diffusers (`transformer.` prefix) or peft (`base_model.model.` prefix) LoRA file -> adapter state."""
  return flux.load_lora_weights(abstract_adapters, path, scale, mesh=mesh, rules=rules,
                                table=QWEN_IMAGE_LORA_WEIGHTS)


def load_qwen_image_transformer(folder: str, *, dtype: str = "float32", param_dtype: str | None = None,
                                lora: LoraSpec | None = None, lora_weights: str | None = None, remat: str = "none",
                                attention_impl: str = "auto", scan_blocks: bool = True, mesh=None,
                                rules=shd.DEFAULT_RULES, seed: int = 0) -> QwenImageTransformer:
  """Read a diffusers QwenImageTransformer2DModel folder (or a pipeline folder holding `transformer/`), tensor by
  tensor, into its target sharding. With `lora`, fresh adapters are attached (or read from `lora_weights`, a
  diffusers/peft LoRA safetensors file)."""
  folder = wio.model_folder(folder, "transformer")
  cfg = QwenImageConfig.from_diffusers_config(wio.read_config(folder), source=os.path.join(folder, "config.json"),
                                              dtype=dtype, param_dtype=param_dtype or dtype, lora=lora, remat=remat,
                                              attention_impl=attention_impl, scan_blocks=scan_blocks)
  abstract = nnx.eval_shape(lambda: QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))
  return flux.fill_transformer(abstract, folder, QWEN_IMAGE_WEIGHTS, QWEN_IMAGE_LORA_WEIGHTS, lora=lora,
                               lora_weights=lora_weights, mesh=mesh, rules=rules, seed=seed)
