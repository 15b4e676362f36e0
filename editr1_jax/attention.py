"""Softmax attention on (B, L, H, D) tensors, by the kernel the platform does best.

`implementation`: "auto" picks the Pallas splash kernel on TPU, cuDNN's fused kernel on GPU where its limits allow
(half-precision inputs, head_dim <= 128 and a multiple of 8), XLA otherwise; "xla", "cudnn" and "splash" force one
("splash" off TPU runs the kernel in Pallas' interpret mode: exact, slow, for tests). The platform is that of the
mesh the code is traced under (`sharding.use_mesh`: compile-only TPU devices plan as TPU), else the default backend.

What a query may attend to is described, not materialised, so every kernel can take it:
  `kv_valid` (B, Lk) bool: keys that exist (padding False);
  `causal`: query i sits at key position `q_offset + i` and sees keys up to it.
XLA and cuDNN build the (B, 1, Lq, Lk) boolean mask from it. The splash kernel takes the causal part as its static
mask and the validity as segment ids: a valid query sees valid keys; under a causal mask a padding query sees padding
keys, so no row is empty (its softmax would divide by zero); padding rows' outputs differ from XLA's there and are
never used. Sequences are padded to the kernel's block (a multiple of 128) and head_dim to a multiple of 128, the
padding masked or zero, so results do not change. Logits and softmax run in float32 in every kernel.
"""

import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from editr1_jax import sharding as shd

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_LOG = logging.getLogger(__name__)
_LANES = 128  # the splash kernel's block sizes and (on TPU) head_dim are multiples of this
_MAX_BLOCK = 512


def check_implementation(implementation: str, where: str = "attention_impl") -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{where} must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  return implementation


@functools.cache
def _say_once(message: str) -> None:
  _LOG.warning(message)


def platform() -> str:
  """The platform the traced code will run on: the active mesh's devices', else the default backend."""
  mesh = shd.active_mesh()
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def resolve(implementation: str, dtype, head_dim: int, *, has_bias: bool = False, where: str = "attention") -> str:
  """The kernel that runs: "auto" by platform, and "splash" / "cudnn" fall back to XLA (said once) where they cannot
  take the call (an additive bias: T5's relative positions)."""
  check_implementation(implementation)
  if implementation == "auto":
    kind = platform()
    if kind == "tpu":
      implementation = "splash"
    elif kind == "gpu":
      if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0:
        implementation = "cudnn"
      else:
        _say_once(f"{where}: cuDNN attention needs bfloat16/float16 inputs and head_dim <= 128 (a multiple of 8), "
                  f"got {jnp.dtype(dtype).name} and {head_dim}: XLA attention")
        return "xla"
    else:
      return "xla"
  if has_bias and implementation == "splash":
    _say_once(f"{where}: the splash kernel takes no additive bias (relative positions): XLA attention")
    return "xla"
  return implementation


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_valid: jax.Array | None = None, causal: bool = False,
              q_offset: int | jax.Array = 0, bias: jax.Array | None = None, scale: float | None = None,
              implementation: str = "auto", where: str = "attention") -> jax.Array:
  """(B, Lq, H, D) queries over (B, Lk, H, D) keys and values.

  `bias` (broadcastable to (B, H, Lq, Lk)) is added to the scaled logits; `scale` defaults to head_dim ** -0.5.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  kernel = resolve(implementation, q.dtype, q.shape[-1], has_bias=bias is not None, where=where)
  if kernel == "splash":
    return _splash(q, k, v, kv_valid, causal, q_offset, scale)
  mask = dense_mask(q.shape[1], k.shape[1], kv_valid, causal, q_offset)
  if kernel == "cudnn":
    bias = None if bias is None else bias.astype(q.dtype)  # the fused kernel wants one dtype
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def dense_mask(lq: int, lk: int, kv_valid, causal: bool, q_offset) -> jax.Array | None:
  """The (B or 1, 1, Lq, Lk) boolean mask of the description; None when every key is seen."""
  mask = None
  if causal:
    mask = (jnp.arange(lk)[None, :] <= q_offset + jnp.arange(lq)[:, None])[None, None]
  if kv_valid is not None:
    keys = kv_valid.astype(bool)[:, None, None, :]
    mask = keys if mask is None else mask & keys
  return mask


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def block_size(length: int) -> int:
  """The splash block for a sequence: the whole sequence (rounded up to 128) when short, else 512."""
  return min(_MAX_BLOCK, _round_up(length, _LANES))


def _pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _splash(q, k, v, kv_valid, causal: bool, q_offset, scale: float) -> jax.Array:
  batch, lq, heads, dim = q.shape
  lk = k.shape[1]
  static_offset = not isinstance(q_offset, jax.Array)  # a host number (a numpy 0-d array included)
  if causal and not static_offset and lq != 1:
    raise ValueError(f"splash attention: a causal mask with a traced query offset takes one query at a time, got {lq}")
  bq, bkv = block_size(lq), block_size(lk)
  lq_p, lk_p, dim_p = _round_up(lq, bq), _round_up(lk, bkv), _round_up(dim, _LANES)
  valid = jnp.ones((batch, lk), bool) if kv_valid is None else kv_valid.astype(bool)
  if causal and not static_offset:  # one new token over a cache: it sees the filled positions up to its own
    valid = valid & (jnp.arange(lk)[None, :] <= q_offset)
  kv_seg = _pad_to(valid.astype(jnp.int32), 1, lk_p)
  q_seg = jnp.ones((batch, lq_p), jnp.int32)
  if causal and static_offset:  # a padding query sees padding keys (its own position among them): no empty row
    own = _pad_to(valid, 1, max(lk, q_offset + lq), True)[:, q_offset:q_offset + lq]
    q_seg = _pad_to(own.astype(jnp.int32), 1, lq_p, 1)
  pad = lambda x, length: _pad_to(_pad_to(x, 3, dim_p), 1, length)
  q = pad((q.astype(jnp.float32) * scale).astype(q.dtype), lq_p)  # the kernel does not scale the logits
  k, v = pad(k, lk_p), pad(v, lk_p)
  run = functools.partial(_splash_local, causal=causal and static_offset,
                          q_offset=int(q_offset) if static_offset else 0, blocks=(bq, bkv),
                          interpret=platform() != "tpu")
  mesh = shd.active_mesh()
  if mesh is not None:
    run = _sharded(run, mesh, q.shape, k.shape)
  out = run(q, k, v, q_seg, kv_seg)
  return out[:, :lq, :, :dim]


def _splash_local(q, k, v, q_seg, kv_seg, *, causal: bool, q_offset: int, blocks: tuple[int, int], interpret: bool):
  """The kernel on this device's rows and heads ((B, L, H, D) in and out)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  heads, (lq, lk) = q.shape[2], (q.shape[1], k.shape[1])
  one = splash.CausalMask((lq, lk), offset=q_offset) if causal else splash.FullMask((lq, lk))
  bq, bkv = blocks
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                            block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # (B, H, L, D)
  out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks)))(
      heads_first(q), heads_first(k), heads_first(v), q_seg, kv_seg)
  return heads_first(out)


def _sharded(run, mesh, q_shape: Sequence[int], k_shape: Sequence[int]):
  """`run` under shard_map: each device takes its rows and heads as the sharding rules place them (a Pallas kernel
  is opaque to XLA's partitioner)."""
  rules = shd.active_rules()
  spec = lambda shape: shd.logical_to_spec(("batch", None, "heads", None), rules, shape=shape, mesh=mesh)
  q_spec, k_spec = spec(q_shape), spec(k_shape)
  if q_spec[2] != k_spec[2]:  # keys and queries must split their heads alike
    k_spec = q_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
  rows = jax.sharding.PartitionSpec(q_spec[0], None)
  return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, rows, rows), out_specs=q_spec,
                       check_vma=False)
