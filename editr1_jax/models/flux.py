"""FLUX.1 transformer (Kontext), equal to diffusers' `FluxTransformer2DModel`.

Sequence layout: [text tokens | target image tokens | reference image tokens]; the caller slices the
target part of the output. Timestep, guidance and rotary math run in float32 whatever the compute
dtype. Module and parameter names follow diffusers so the weight table below stays short.
"""

import dataclasses
import difflib
import functools
import json
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from editr1_jax import attention as attn_lib
from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.layers import AdapterRows, Dense, LoraSpec, RMSNorm, StackedBlocks, first_unlike, \
  gelu_tanh, layer_norm, layer_paths, lora_init, remat_policy, split_adapters, target_matches

# peft target keys of docs/METHOD.md section 7; matched as dotted suffixes of diffusers module names.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
REMAT_POLICIES = ("none", "full", "flux")
# The "flux" remat policy keeps what is costly to recompute: the q/k/v projections and attention output.
_SAVED_BY_FLUX_POLICY = ("flux_qkv", "flux_attention")


@dataclasses.dataclass(frozen=True)
class FluxConfig(wio.DiffusersConfig):
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = True
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  rope_theta: float = 10000.0
  patch_size: int = 1
  mlp_ratio: float = 4.0
  # runtime, not architecture
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of REMAT_POLICIES
  attention_impl: str = "auto"  # one of attention.IMPLEMENTATIONS (editr1_jax/attention.py)
  scan_blocks: bool = True  # each kind of block stacked and run by one lax.scan where its blocks are alike
  lora: LoraSpec | None = None

  def __post_init__(self):
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                       f"{self.attention_head_dim}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    attn_lib.check_implementation(self.attention_impl)
    if self.patch_size != 1:
      raise ValueError("only patch_size 1 (latents are packed 2x2 outside the model) is supported")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def out_dim(self) -> int:
    return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

  _CLASS_NAME = "FluxTransformer2DModel"
  _DIFFUSERS_KEYS = ("in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds",
                     "patch_size", "axes_dims_rope")


def kontext_dev(**runtime) -> FluxConfig:
  """FLUX.1-Kontext-dev: 11,901,408,320 parameters."""
  return FluxConfig(**runtime)


def tiny(**runtime) -> FluxConfig:
  return FluxConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6), **runtime)


# --------------------------------------------------------------------------------------------------
# Weight table: our parameter path (regex) -> diffusers tensor name, layout. First match wins.
FLUX_WEIGHTS = (
    wio.WeightRule(r"(.*)\.to_out\.kernel", r"\1.to_out.0.weight", "linear"),
    wio.WeightRule(r"(.*)\.to_out\.bias", r"\1.to_out.0.bias"),
    wio.WeightRule(r"(.*)\.fc1\.kernel", r"\1.net.0.proj.weight", "linear"),
    wio.WeightRule(r"(.*)\.fc1\.bias", r"\1.net.0.proj.bias"),
    wio.WeightRule(r"(.*)\.fc2\.kernel", r"\1.net.2.weight", "linear"),
    wio.WeightRule(r"(.*)\.fc2\.bias", r"\1.net.2.bias"),
    wio.WeightRule(r"(.*)\.scale", r"\1.weight"),
    wio.WeightRule(r"(.*)\.kernel", r"\1.weight", "linear"),
    wio.WeightRule(r"(.*)\.bias", r"\1.bias"),
)

# Adapter table: ours -> the diffusers/peft LoRA name (without the `transformer.` prefix).
FLUX_LORA_WEIGHTS = (
    wio.WeightRule(r"(.*)\.to_out\.lora_a", r"\1.to_out.0.lora_A.weight", "lora"),
    wio.WeightRule(r"(.*)\.to_out\.lora_b", r"\1.to_out.0.lora_B.weight", "lora"),
    wio.WeightRule(r"(.*)\.fc1\.lora_a", r"\1.net.0.proj.lora_A.weight", "lora"),
    wio.WeightRule(r"(.*)\.fc1\.lora_b", r"\1.net.0.proj.lora_B.weight", "lora"),
    wio.WeightRule(r"(.*)\.fc2\.lora_a", r"\1.net.2.lora_A.weight", "lora"),
    wio.WeightRule(r"(.*)\.fc2\.lora_b", r"\1.net.2.lora_B.weight", "lora"),
    wio.WeightRule(r"(.*)\.lora_a", r"\1.lora_A.weight", "lora"),
    wio.WeightRule(r"(.*)\.lora_b", r"\1.lora_B.weight", "lora"),
)
LORA_PREFIXES = ("transformer.", "base_model.model.")


# --------------------------------------------------------------------------------------------------
def _np_float32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0, scale: float = 1.0) -> jax.Array:
  """Sinusoidal embedding, cos first (flip_sin_to_cos, shift 0), computed in float32 like diffusers.

  `scale` multiplies the arguments after the frequencies, in that order (diffusers' `Timesteps(scale=...)`),
  so the float32 rounding matches a reference that scales there (Qwen-Image: 1000).
  """
  half = dim // 2
  exponent = _np_float32(-np.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
  freqs = jnp.asarray(np.exp(exponent.astype(np.float32)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  if scale != 1.0:
    args = args * np.float32(scale)
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(ids: jax.Array, axes_dims: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
  """Interleaved cos/sin tables (..., L, head_dim) for 3-axis positions (..., L, 3), in float32."""
  pos = ids.astype(jnp.float32)
  cos, sin = [], []
  for i, d in enumerate(axes_dims):
    freqs = jnp.asarray((1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32))
    angles = pos[..., i:i + 1] * freqs
    cos.append(jnp.repeat(jnp.cos(angles), 2, axis=-1))
    sin.append(jnp.repeat(jnp.sin(angles), 2, axis=-1))
  return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """x (B, L, H, D); tables (L, D) or (B, L, D). Pairs (2i, 2i+1) rotate together."""
  cos, sin = (r[..., :, None, :] for r in rope)
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def _per_token(a: jax.Array) -> jax.Array:
  """A modulation array over the tokens: one row's (B, D) broadcast to every token, or already (B, L, D)."""
  return a[:, None] if a.ndim == 2 else a


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """LayerNorm(x) * (1 + scale) + shift, in float32; shift and scale per row (B, D) or per token (B, L, D)."""
  y = layer_norm(x) * (1.0 + _per_token(scale.astype(jnp.float32))) + _per_token(shift.astype(jnp.float32))
  return y.astype(dtype)


class _Factory:
  """Builds layers with the config's dtypes and the LoRA spec if their diffusers name is targeted."""

  def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs):
    self.cfg, self.rngs = cfg, rngs
    self.dtype, self.param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

  def dense(self, name: str, n_in: int, n_out: int, axes) -> Dense:
    lora = self.cfg.lora if self.cfg.lora is not None and self.cfg.lora.matches(name) else None
    return Dense(n_in, n_out, axes=axes, rngs=self.rngs, dtype=self.dtype, param_dtype=self.param_dtype, lora=lora)

  def rms(self) -> RMSNorm:
    return RMSNorm(self.cfg.attention_head_dim, eps=1e-6, axes=("kv",), param_dtype=self.param_dtype,
                   dtype=self.dtype)


class MLPEmbedder(nnx.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

  def __init__(self, f: _Factory, name: str, n_in: int, dim: int):
    self.linear_1 = f.dense(f"{name}.linear_1", n_in, dim, (None, "embed"))
    self.linear_2 = f.dense(f"{name}.linear_2", dim, dim, ("embed", None))

  def __call__(self, x, adapters=None):
    return self.linear_2(jax.nn.silu(self.linear_1(x, adapters)), adapters)


class TimeTextEmbed(nnx.Module):

  def __init__(self, f: _Factory):
    cfg, dim = f.cfg, f.cfg.inner_dim
    self.timestep_embedder = MLPEmbedder(f, "time_text_embed.timestep_embedder", 256, dim)
    self.guidance_embedder = (MLPEmbedder(f, "time_text_embed.guidance_embedder", 256, dim)
                              if cfg.guidance_embeds else None)
    self.text_embedder = MLPEmbedder(f, "time_text_embed.text_embedder", cfg.pooled_projection_dim, dim)

  def __call__(self, t1000, g1000, pooled, adapters=None):
    emb = self.timestep_embedder(timestep_embedding(t1000), adapters)
    if self.guidance_embedder is not None:
      emb = emb + self.guidance_embedder(timestep_embedding(g1000), adapters)
    return emb + self.text_embedder(pooled, adapters)


class AdaNorm(nnx.Module):
  """The modulation projection linear(silu(temb)) of diffusers' AdaLayerNorm* modules; `layer` is the
  projection's diffusers name inside `name` (what LoRA targets match), e.g. "1" for an nn.Sequential."""

  def __init__(self, f: _Factory, name: str, chunks: int, layer: str = "linear"):
    dim = f.cfg.inner_dim
    self.linear = f.dense(f"{name}.{layer}", dim, chunks * dim, ("embed", None))
    self.chunks = chunks

  def __call__(self, temb, adapters=None):
    return jnp.split(self.linear(jax.nn.silu(temb), adapters), self.chunks, axis=-1)


class FeedForward(nnx.Module):

  def __init__(self, f: _Factory, name: str):
    dim = f.cfg.inner_dim
    self.fc1 = f.dense(f"{name}.net.0.proj", dim, 4 * dim, ("embed", "mlp"))
    self.fc2 = f.dense(f"{name}.net.2", 4 * dim, dim, ("mlp", "embed"))

  def __call__(self, x, adapters=None):
    h = shd.constrain(gelu_tanh(self.fc1(x, adapters)), ("batch", "seq", "mlp"))
    return self.fc2(h, adapters)


def _heads(cfg: FluxConfig, x: jax.Array) -> jax.Array:
  x = x.reshape(x.shape[:-1] + (cfg.num_attention_heads, cfg.attention_head_dim))
  return shd.constrain(x, ("batch", "seq", "heads", "kv"))


class Attention(nnx.Module):
  """Joint attention; with `context=True` it holds the text stream's projections too (double blocks)."""

  def __init__(self, f: _Factory, name: str, *, context: bool, output: bool):
    dim = f.cfg.inner_dim
    self.cfg = f.cfg
    self.to_q = f.dense(f"{name}.to_q", dim, dim, ("embed", "heads"))
    self.to_k = f.dense(f"{name}.to_k", dim, dim, ("embed", "heads"))
    self.to_v = f.dense(f"{name}.to_v", dim, dim, ("embed", "heads"))
    self.norm_q, self.norm_k = f.rms(), f.rms()
    self.to_out = f.dense(f"{name}.to_out.0", dim, dim, ("heads", "embed")) if output else None
    if context:
      self.add_q_proj = f.dense(f"{name}.add_q_proj", dim, dim, ("embed", "heads"))
      self.add_k_proj = f.dense(f"{name}.add_k_proj", dim, dim, ("embed", "heads"))
      self.add_v_proj = f.dense(f"{name}.add_v_proj", dim, dim, ("embed", "heads"))
      self.norm_added_q, self.norm_added_k = f.rms(), f.rms()
      self.to_add_out = f.dense(f"{name}.to_add_out", dim, dim, ("heads", "embed"))
    else:
      self.add_q_proj = None

  def _qkv(self, x, proj_q, proj_k, proj_v, norm_q, norm_k, adapters):
    q = norm_q(_heads(self.cfg, proj_q(x, adapters)))
    k = norm_k(_heads(self.cfg, proj_k(x, adapters)))
    v = _heads(self.cfg, proj_v(x, adapters))
    return checkpoint_name(q, "flux_qkv"), checkpoint_name(k, "flux_qkv"), checkpoint_name(v, "flux_qkv")

  def __call__(self, x, rope, context=None, adapters=None, kv_valid=None):
    """`kv_valid`: (B, Lk) keys to attend to over [text | image] (None: all)."""
    q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, adapters)
    if context is not None:
      cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                             self.norm_added_k, adapters)
      q, k, v = (jnp.concatenate(p, axis=1) for p in ((cq, q), (ck, k), (cv, v)))
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    out = attn_lib.attention(q, k, v, kv_valid=kv_valid, implementation=self.cfg.attention_impl,
                             where="joint attention")
    out = checkpoint_name(out.reshape(out.shape[:2] + (-1,)), "flux_attention")
    if context is None:
      return out
    n_txt = context.shape[1]
    return self.to_out(out[:, n_txt:], adapters), self.to_add_out(out[:, :n_txt], adapters)


class DoubleStreamBlock(nnx.Module):
  """diffusers FluxTransformerBlock: separate weights for text and image streams, joint attention."""

  def __init__(self, f: _Factory, name: str):
    self.dtype = f.dtype
    self.norm1 = AdaNorm(f, f"{name}.norm1", 6)
    self.norm1_context = AdaNorm(f, f"{name}.norm1_context", 6)
    self.attn = Attention(f, f"{name}.attn", context=True, output=True)
    self.ff = FeedForward(f, f"{name}.ff")
    self.ff_context = FeedForward(f, f"{name}.ff_context")

  def __call__(self, x, context, temb, rope, adapters=None):
    return double_stream(self.attn, (self.norm1, self.ff), (self.norm1_context, self.ff_context), x, context, temb,
                         rope, self.dtype, adapters)


def double_stream(attn: Attention, image, text, x, context, temb, rope, dtype, adapters=None, kv_valid=None,
                  image_mods=None):
  """One double-stream (MMDiT) block: `image` and `text` are each stream's (6-way modulation, feed-forward);
  joint attention, then gated residuals. Shared by FLUX and Qwen-Image, whose blocks differ only in names.
  `image_mods`: the image stream's six modulation arrays when they are not its modulation of `temb` (Qwen-Image's
  zero_cond_t: per token, (B, L, D))."""
  (mod, ff), (c_mod, c_ff) = image, text
  shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mod(temb, adapters) if image_mods is None else image_mods
  c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod(temb, adapters)
  out, c_out = attn(_modulate(x, shift, scale, dtype), rope, _modulate(context, c_shift, c_scale, dtype), adapters,
                    kv_valid)
  x = x + _per_token(gate) * out
  x = x + _per_token(gate_mlp) * ff(_modulate(x, shift_mlp, scale_mlp, dtype), adapters)
  context = context + c_gate[:, None] * c_out
  context = context + c_gate_mlp[:, None] * c_ff(_modulate(context, c_shift_mlp, c_scale_mlp, dtype), adapters)
  return shd.constrain(context, ("batch", "seq", "act_embed")), shd.constrain(x, ("batch", "seq", "act_embed"))


class SingleStreamBlock(nnx.Module):
  """diffusers FluxSingleTransformerBlock: one weight set over [text | image], attention || MLP."""

  def __init__(self, f: _Factory, name: str):
    dim = f.cfg.inner_dim
    hidden = int(dim * f.cfg.mlp_ratio)
    self.dtype = f.dtype
    self.norm = AdaNorm(f, f"{name}.norm", 3)
    self.proj_mlp = f.dense(f"{name}.proj_mlp", dim, hidden, ("embed", "mlp"))
    self.proj_out = f.dense(f"{name}.proj_out", dim + hidden, dim, ("mlp", "embed"))
    self.attn = Attention(f, f"{name}.attn", context=False, output=False)

  def __call__(self, x, context, temb, rope, adapters=None):
    n_txt = context.shape[1]
    h = jnp.concatenate([context, x], axis=1)
    shift, scale, gate = self.norm(temb, adapters)
    normed = _modulate(h, shift, scale, self.dtype)
    mlp = shd.constrain(gelu_tanh(self.proj_mlp(normed, adapters)), ("batch", "seq", "mlp"))
    attn = self.attn(normed, rope, adapters=adapters)
    h = h + gate[:, None] * self.proj_out(jnp.concatenate([attn, mlp], axis=-1), adapters)
    h = shd.constrain(h, ("batch", "seq", "act_embed"))
    return h[:, :n_txt], h[:, n_txt:]


def _rematted(block: nnx.Module, policy):
  """The block as a pure function under jax.checkpoint (plain JAX, so it composes with jax.jit/grad)."""
  graphdef, state = nnx.split(block)

  @functools.partial(jax.checkpoint, policy=policy)
  def run(state, *args):
    return nnx.merge(graphdef, state)(*args)

  return functools.partial(run, state)


def block_policy(remat: str):
  """The jax.checkpoint policy of one of REMAT_POLICIES ("flux" keeps q/k/v and attention), None for "none"."""
  if remat == "none":
    return None
  return remat_policy("full") if remat == "full" else remat_policy("names", _SAVED_BY_FLUX_POLICY)


def block_list(blocks: list[nnx.Module], where: str, scan: bool):
  """A model's blocks of one kind: stacked for a scan (`StackedBlocks`) when `scan` and they are alike, else kept
  apart in a list (LoRA targets that name some blocks only, as partial community LoRA files do, make them unlike)."""
  return StackedBlocks(blocks, where) if scan and blocks and first_unlike(blocks) is None else nnx.List(blocks)


def run_blocks(blocks, remat: str, x, context, *args) -> tuple[jax.Array, jax.Array]:
  """(context, x) after every block (a `block_list`), each called as block(x, context, *args) -> (context, x)."""
  policy = block_policy(remat)
  if isinstance(blocks, StackedBlocks):
    x, context = blocks.scan(lambda block, carry, _: block(*carry, *args)[::-1], (x, context), policy)
    return context, x
  for block in blocks:
    run = block if policy is None else _rematted(block, policy)
    context, x = run(x, context, *args)
  return context, x


class FluxTransformer(nnx.Module):

  def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs):
    f = _Factory(cfg, rngs)
    dim = cfg.inner_dim
    self.cfg = cfg
    self.x_embedder = f.dense("x_embedder", cfg.in_channels, dim, (None, "embed"))
    self.context_embedder = f.dense("context_embedder", cfg.joint_attention_dim, dim, (None, "embed"))
    self.time_text_embed = TimeTextEmbed(f)
    self.transformer_blocks = block_list(
        [DoubleStreamBlock(f, f"transformer_blocks.{i}") for i in range(cfg.num_layers)], "transformer_blocks",
        cfg.scan_blocks)
    self.single_transformer_blocks = block_list(
        [SingleStreamBlock(f, f"single_transformer_blocks.{i}") for i in range(cfg.num_single_layers)],
        "single_transformer_blocks", cfg.scan_blocks)
    self.norm_out = AdaNorm(f, "norm_out", 2)
    self.proj_out = f.dense("proj_out", dim, cfg.out_dim, ("embed", None))
    if cfg.lora is not None:
      check_lora_targets(cfg.lora.targets, "lora.targets", layers=adapter_layers(self))

  def __call__(self, *, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
               guidance=None, adapters: AdapterRows | None = None) -> jax.Array:
    """Mirrors diffusers' forward; returns (B, L_img, out_channels) for all image tokens given."""
    cfg = self.cfg
    batch = hidden_states.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,)) * 1000.0
    if cfg.guidance_embeds:
      if guidance is None:
        raise ValueError("this transformer has guidance embeddings: pass `guidance`")
      g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (batch,)) * 1000.0
    else:
      g = None
    x = shd.constrain(self.x_embedder(hidden_states, adapters), ("batch", "seq", "act_embed"))
    context = shd.constrain(self.context_embedder(encoder_hidden_states, adapters), ("batch", "seq", "act_embed"))
    temb = self.time_text_embed(t, g, pooled_projections.astype(jnp.dtype(cfg.dtype)), adapters)
    rope = rope_tables(jnp.concatenate([txt_ids, img_ids], axis=-2), cfg.axes_dims_rope, cfg.rope_theta)

    for blocks in (self.transformer_blocks, self.single_transformer_blocks):
      context, x = run_blocks(blocks, cfg.remat, x, context, temb, rope, adapters)
    scale, shift = self.norm_out(temb, adapters)
    return self.proj_out(_modulate(x, shift, scale, jnp.dtype(cfg.dtype)), adapters)


# --------------------------------------------------------------------------------------------------
def adapter_layers(model: nnx.Module, table=FLUX_WEIGHTS) -> list[str]:
  """The diffusers names of the model's Dense layers (through its weight `table`): what peft target keys are
  matched against."""
  return [wio.reference_name(wio.path_str(one) + ".kernel", table)[0].removesuffix(".weight")
          for path, node in nnx.iter_graph(model) if isinstance(node, Dense)
          for one in layer_paths(path, node.kernel.get_value().shape[0])]


def repeat_blocks(names: Sequence[str], depth: dict[str, int]) -> tuple[str, ...]:
  """Layer names read off a model with one block of each kind (`<kind>.0.<rest>`), repeated over the
  `depth[kind]` blocks of the real model: tracing every block of a large model takes seconds."""
  out = []
  for name in names:
    block = re.fullmatch(r"(\w+)\.0\.(.*)", name)
    out += [f"{block[1]}.{i}.{block[2]}" for i in range(depth[block[1]])] if block else [name]
  return tuple(out)


@functools.cache
def _kontext_adapter_layers() -> tuple[str, ...]:
  """FLUX.1-Kontext-dev's adapter layers (repeat_blocks)."""
  full = kontext_dev()
  one = nnx.eval_shape(lambda: FluxTransformer(full.replace(num_layers=1, num_single_layers=1), rngs=nnx.Rngs(0)))
  return repeat_blocks(adapter_layers(one), {"transformer_blocks": full.num_layers,
                                             "single_transformer_blocks": full.num_single_layers})


def check_lora_targets(targets: Sequence[str], where: str, *, layers: Sequence[str] | None = None,
                       model: str = "FLUX") -> None:
  """Every peft target key must match a layer (of `layers`, FLUX.1-Kontext-dev's by default): one that matches
  none would train nothing, silently. Needs no weights, so config validation calls it before loading.
  `model` names the transformer in the message."""
  layers = _kontext_adapter_layers() if layers is None else layers
  unmatched = [t for t in targets if not any(target_matches(t, name) for name in layers)]
  if unmatched:
    said = ", ".join(repr(t) for t in unmatched)
    said = f"targets {said} match" if len(unmatched) > 1 else f"target {said} matches"
    unindexed = {re.sub(r"^\w+\.\d+\.", "", n) for n in layers}  # a block's layer, as peft keys name it
    suffixes = {".".join(parts[i:]) for parts in (n.split(".") for n in unindexed) for i in range(len(parts))}
    close = sorted({c for t in unmatched for c in difflib.get_close_matches(t, suffixes, n=3)})
    hint = f"; closest: {', '.join(map(repr, close))}" if close else ""
    raise ValueError(f"{where}: {said} no layer of the {model} transformer{hint}; adaptable layers: "
                     f"{', '.join(layer_kinds(layers))}")


def layer_kinds(layers: Sequence[str], limit: int = 10) -> list[str]:
  """The kinds of layer in `layers`, a few words each: a stack of blocks as its index range and its number of kinds
  of layer (`transformer_blocks.<0-18>.* (14 kinds)`), a module with several layers as one entry. A full list of
  a model's layers is over a thousand characters: an error names the kinds instead."""
  groups: dict[str, tuple[set, set]] = {}
  for name in layers:
    m = re.match(r"(\w+)\.(\d+)\.", name)
    top = m.group(1) if m else name.split(".")[0]
    indices, kinds = groups.setdefault(top, (set(), set()))
    if m:
      indices.add(int(m.group(2)))
    kinds.add(name[m.end():] if m else name)
  out = []
  for top, (indices, kinds) in sorted(groups.items()):
    if indices:
      out.append(f"{top}.<{min(indices)}-{max(indices)}>.* ({len(kinds)} kinds)")
    else:
      out.append(next(iter(kinds)) if len(kinds) == 1 else f"{top}.* ({len(kinds)} kinds)")
  return out[:limit] + ([f"{len(out) - limit} more"] if len(out) > limit else [])


split_params = split_adapters  # (graphdef, adapter state, base state) of a FLUX transformer


def init_adapters(abstract_adapters, key: jax.Array, *, mesh=None, rules=shd.DEFAULT_RULES):
  """Fresh adapter state (A Gaussian, B zero) in its target sharding, without building the base."""
  flat = nnx.to_flat_state(abstract_adapters)

  def make(key):
    keys = jax.random.split(key, max(len(flat), 1))
    return nnx.from_flat_state([
        (path, var.replace(lora_init(keys[i], str(path[-1]), var.get_value().shape, var.get_value().dtype)))
        for i, (path, var) in enumerate(flat)
    ])

  shardings = None if mesh is None else shd.state_shardings(abstract_adapters, mesh, rules)
  return jax.jit(make, out_shardings=shardings)(key)


def load_flux_transformer(folder: str, *, dtype: str = "float32", param_dtype: str | None = None,
                          lora: LoraSpec | None = None, lora_weights: str | None = None, remat: str = "none",
                          attention_impl: str = "auto", scan_blocks: bool = True, mesh=None, rules=shd.DEFAULT_RULES,
                          seed: int = 0) -> FluxTransformer:
  """Read a diffusers FluxTransformer2DModel folder, tensor by tensor, into its target sharding.

  With `lora`, fresh adapters are attached (or read from `lora_weights`, a diffusers/peft LoRA
  safetensors file).
  """
  folder = wio.model_folder(folder, "transformer")
  cfg = FluxConfig.from_diffusers_config(wio.read_config(folder), source=os.path.join(folder, "config.json"),
                                         dtype=dtype, param_dtype=param_dtype or dtype, lora=lora, remat=remat,
                                         attention_impl=attention_impl, scan_blocks=scan_blocks)
  abstract = nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0)))
  return fill_transformer(abstract, folder, FLUX_WEIGHTS, FLUX_LORA_WEIGHTS, lora=lora, lora_weights=lora_weights,
                          mesh=mesh, rules=rules, seed=seed)


def fill_transformer(abstract: nnx.Module, folder: str, table, lora_table, *, lora: LoraSpec | None,
                     lora_weights: str | None, mesh, rules, seed: int) -> nnx.Module:
  """An abstract transformer with its base read from `folder` through `table` and its adapters read from
  `lora_weights` through `lora_table`, or fresh from `seed`; each tensor straight into its sharding."""
  if lora_weights is not None and lora is None:
    raise ValueError(f"{lora_weights}: pass `lora=LoraSpec(...)` to say the rank, alpha and targets to load into")
  graphdef, abstract_adapters, abstract_base = split_params(abstract)
  base = wio.load_state(abstract_base, wio.SafetensorsReader.from_folder(folder), table, source=folder,
                        mesh=mesh, rules=rules)
  if lora_weights is not None:
    adapters = load_lora_weights(abstract_adapters, lora_weights, lora.scale, mesh=mesh, rules=rules,
                                 table=lora_table)
  else:
    adapters = init_adapters(abstract_adapters, jax.random.key(seed), mesh=mesh, rules=rules)
  return nnx.merge(graphdef, adapters, base)


def _check_lora_metadata(metadata: dict, abstract_adapters, scale: float, path: str) -> None:
  """A file that records its rank/alpha (diffusers' `lora_adapter_metadata`) must agree with ours."""
  if "lora_adapter_metadata" not in metadata:
    return
  config = json.loads(metadata["lora_adapter_metadata"])
  rank, alpha = config.get("transformer.r"), config.get("transformer.lora_alpha")
  if rank is None or alpha is None:
    return
  ours = {int(v.get_value().shape[-1]) for p, v in nnx.to_flat_state(abstract_adapters) if p[-1] == "lora_a"}
  if ours != {int(rank)} or abs(alpha / rank - scale) > 1e-9 * scale:
    raise wio.CheckpointError(f"{path}: adapter has rank {rank}, alpha {alpha}; the model was built with rank(s) "
                              f"{sorted(ours)} and scale alpha/rank = {scale}")


def load_lora_weights(abstract_adapters, path: str, scale: float, *, mesh=None, rules=shd.DEFAULT_RULES,
                      table=FLUX_LORA_WEIGHTS):
  """A diffusers (`transformer.` prefix) or peft (`base_model.model.` prefix) LoRA file -> adapter state."""
  reader = wio.SafetensorsReader([path])
  _check_lora_metadata(reader.metadata, abstract_adapters, scale, path)
  return wio.load_state(abstract_adapters, reader, table, source=path, mesh=mesh, rules=rules,
                        strip_prefixes=LORA_PREFIXES)
