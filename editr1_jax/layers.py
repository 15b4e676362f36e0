"""Building blocks shared by the ported networks.

Normalisation statistics, softmax and rotary math run in float32 whatever the compute dtype.
`Dense` can hold LoRA adapters: `lora_a` (n, in, r) / `lora_b` (n, r, out) are `nnx.LoRAParam`s (with a leading
block axis before n when `StackedBlocks` holds them), so
`nnx.split(model, nnx.LoRAParam, ...)` separates the trainable adapters from the frozen base, and
`AdapterRows` picks, per batch row, which of the n stacked adapters applies and at what scale.
"""

import dataclasses
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx



@flax.struct.dataclass
class AdapterRows:
  """Per-row adapter choice: row b uses adapter `index[b]` scaled by `scale[b]` (0 = base model)."""

  index: jax.Array  # (B,) int32
  scale: jax.Array  # (B,) float32

  @classmethod
  def uniform(cls, batch: int, index: int = 0, scale: float = 1.0) -> "AdapterRows":
    return cls(jnp.full((batch,), index, jnp.int32), jnp.full((batch,), scale, jnp.float32))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float
  targets: tuple[str, ...]

  def __post_init__(self):
    if self.rank <= 0:
      raise ValueError(f"lora rank must be positive, got {self.rank}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def matches(self, module_name: str) -> bool:
    return any(target_matches(t, module_name) for t in self.targets)


def target_matches(target: str, module_name: str) -> bool:
  """peft's rule: the key equals the module name or is a dotted suffix of it."""
  return module_name == target or module_name.endswith("." + target)


def split_adapters(model: nnx.Module):
  """(graphdef, adapter state, base state): the trainable/frozen split of any model with LoRA adapters."""
  return nnx.split(model, nnx.LoRAParam, ...)


def lora_init(key: jax.Array, kind: str, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """peft's "gaussian" init: A ~ N(0, 1/rank^2) (std 1/rank), B = 0, so a new adapter is a no-op."""
  if kind == "lora_a":
    return (jax.random.normal(key, shape, jnp.float32) / shape[-1]).astype(dtype)
  if kind == "lora_b":
    return jnp.zeros(shape, dtype)
  raise ValueError(f"unknown LoRA parameter kind {kind!r}")


class Dense(nnx.Module):
  """y = x W + b (+ per-row LoRA). W is (in, out) with logical axes `axes`."""

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
               rngs: nnx.Rngs, use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               lora: LoraSpec | None = None):
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype), logical_axes=axes)
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
                 if use_bias else None)
    self.dtype = dtype
    if lora is not None:
      a_shape, b_shape = (1, in_features, lora.rank), (1, lora.rank, out_features)
      self.lora_a = nnx.LoRAParam(lora_init(rngs.params(), "lora_a", a_shape, param_dtype),
                                  logical_axes=("adapters", axes[0], "lora_rank"))
      self.lora_b = nnx.LoRAParam(lora_init(rngs.params(), "lora_b", b_shape, param_dtype),
                                  logical_axes=("adapters", "lora_rank", axes[1]))
      self.lora_scale = lora.scale
    else:
      self.lora_a = self.lora_b = None
      self.lora_scale = 0.0

  def __call__(self, x: jax.Array, adapters: AdapterRows | None = None) -> jax.Array:
    x = x.astype(self.dtype)
    y = jnp.dot(x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is None:
      return y
    a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
    if adapters is None:  # the single (first) adapter at full scale
      return y + self.lora_scale * jnp.dot(jnp.dot(x, a[0]), b[0])
    a, b = a[adapters.index], b[adapters.index]  # (B, in, r), (B, r, out)
    h = jnp.einsum("b...i,bir->b...r", x, a)
    delta = jnp.einsum("b...r,bro->b...o", h, b)
    scale = (adapters.scale * self.lora_scale).astype(self.dtype)
    return y + delta * scale.reshape((-1,) + (1,) * (delta.ndim - 1))


class RMSNorm(nnx.Module):
  """x / rms(x) * w, statistics in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axes=(None,), param_dtype=jnp.float32, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=axes)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (torch nn.LayerNorm), statistics in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-5, axes=(None,), param_dtype=jnp.float32, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=axes)
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=axes)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layer_norm(x, self.eps) * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class Embed(nnx.Module):
  """Token/position lookup table (torch nn.Embedding): `embedding` is (num, dim)."""

  def __init__(self, num: int, dim: int, *, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
               param_dtype=jnp.float32, dtype=jnp.float32):
    init = nnx.initializers.normal(0.02)
    self.embedding = nnx.Param(init(rngs.params(), (num, dim), param_dtype), logical_axes=axes)
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters, in float32 (returns float32)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + eps)


def remat_policy(name: str, saved_names: Sequence[str] = ()):
  """'none' -> None (no remat); 'full' -> recompute everything; 'names' -> keep the named activations."""
  if name == "none":
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "names":
    return jax.checkpoint_policies.save_only_these_names(*saved_names)
  raise ValueError(f"remat policy must be 'none', 'full' or 'names', got {name!r}")


STACKED = "stacked"  # the path element under which `StackedBlocks` keeps its blocks' stacked parameters
LAYERS = "layers"  # the logical axis of that stacking (the sharding rules map it to no mesh axis)


class StackedBlocks(nnx.Module):
  """Blocks of one structure with their parameters stacked on a leading `LAYERS` axis, run by one `lax.scan`.

  The compiled program then holds one block whatever the depth (compile time and host memory stop growing with
  it), and under FSDP only the running block's weights are gathered at a time. A parameter's checkpoint name puts
  the block's index where `STACKED` sits in its path (`layer_paths`), so the weight tables do not change.
  """

  def __init__(self, blocks: Sequence[nnx.Module], where: str):
    if not blocks:
      raise ValueError(f"{where}: no blocks to stack")
    unlike = first_unlike(blocks)
    if unlike is not None:
      raise ValueError(f"{where}.{unlike} is built unlike {where}.0: blocks run by a scan must be alike")
    graphdefs, states = zip(*(nnx.split(block) for block in blocks))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    for _, var in nnx.to_flat_state(stacked):
      axes = var.get_metadata().get("logical_axes")
      if axes is not None:
        var.set_metadata(logical_axes=(LAYERS,) + tuple(axes))
    setattr(self, STACKED, nnx.merge(graphdefs[0], stacked))

  @property
  def depth(self) -> int:
    return jax.tree.leaves(nnx.state(getattr(self, STACKED)))[0].shape[0]

  def scan(self, step: Callable, carry, policy=None):
    """`carry` through every block in order, `step(block, carry, index) -> carry` (index: the block's, traced);
    `policy` (a `remat_policy`) puts each block under jax.checkpoint."""
    graphdef, state = nnx.split(getattr(self, STACKED))

    def body(carry, layer):
      state, index = layer
      return step(nnx.merge(graphdef, state), carry, index), None

    if policy is not None:  # the scan already keeps the blocks apart: no CSE barrier needed
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    return jax.lax.scan(body, carry, (state, jnp.arange(self.depth)))[0]


def first_unlike(blocks: Sequence[nnx.Module]) -> int | None:
  """The index of the first block whose structure differs from block 0's, None when all are alike (what
  `StackedBlocks` needs)."""
  first = nnx.graphdef(blocks[0])
  return next((i for i, b in enumerate(blocks[1:], 1) if nnx.graphdef(b) != first), None)


def layer_paths(path: tuple, depth: int) -> list[tuple]:
  """The per-block paths of a parameter: one per block, the index in place of `STACKED`, for a stacked parameter of
  `depth` blocks; the path itself otherwise."""
  if STACKED not in path:
    return [path]
  k = path.index(STACKED)
  return [path[:k] + (i,) + path[k + 1:] for i in range(depth)]


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)

