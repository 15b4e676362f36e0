"""T5 v1.1 encoder, equal to transformers' `T5EncoderModel` (FLUX's text_encoder_2).

Pre-norm blocks with T5's RMS layer norm (no mean, no bias), unscaled attention logits plus a
relative position bias that block 0 holds and every block reuses, a gated-gelu (tanh) FFN and a
final layer norm. Module names follow transformers so the weight table stays short.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.attention import attention, check_implementation
from editr1_jax.layers import Dense, Embed, RMSNorm, StackedBlocks, gelu_tanh


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # runtime, not architecture
  dtype: str = "float32"
  param_dtype: str = "float32"
  # one of attention.IMPLEMENTATIONS; no kernel but XLA's and cuDNN's takes T5's relative-position bias, so "auto"
  # and "splash" run XLA on TPU (said once in the log)
  attention_impl: str = "auto"

  def __post_init__(self):
    check_implementation(self.attention_impl)
    if "float16" in (self.dtype, self.param_dtype):
      # transformers then keeps `wo` in float32 (`_keep_in_fp32_modules`) since T5 overflows float16.
      raise ValueError("T5 in float16 is not supported: use float32 or bfloat16")

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  _TRANSFORMERS_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                        "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon")

  @classmethod
  def from_transformers_config(cls, config: dict, *, source: str = "config", **runtime) -> "T5Config":
    ffn = config.get("feed_forward_proj", "relu")
    if ffn not in ("gated-gelu", "gated-gelu_new"):
      raise ValueError(f"{source}: feed_forward_proj {ffn!r} is not supported (T5 v1.1 uses 'gated-gelu')")
    if config.get("is_decoder", False):
      raise ValueError(f"{source}: is_decoder is true; only the bidirectional encoder is supported")
    return cls(**wio.config_fields(cls, config, cls._TRANSFORMERS_KEYS, source), **runtime)


def t5_xxl(**runtime) -> T5Config:
  """FLUX's text_encoder_2 (google/t5-v1_1-xxl encoder): 4,762,310,656 parameters."""
  return T5Config(**runtime)


def tiny(**runtime) -> T5Config:
  return T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, **runtime)


# Our parameter path (regex) -> transformers tensor name, layout. The relative position table, shared by every
# block, is held by the stack (so the blocks are alike and scanned); transformers keeps it in block 0.
T5_WEIGHTS = (
    wio.WeightRule(r"encoder\.relative_attention_bias\.embedding",
                   r"encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    wio.WeightRule(r"(.*)\.embedding", r"\1.weight"),
    wio.WeightRule(r"(.*)\.kernel", r"\1.weight", "linear"),
    wio.WeightRule(r"(.*)\.scale", r"\1.weight"),
)
# The input embedding is tied: transformers saves `shared.weight`; some checkpoints also (or only)
# hold the same table as `encoder.embed_tokens.weight`.
SHARED_EMBEDDING = "shared.weight"
ENCODER_EMBEDDING = "encoder.embed_tokens.weight"


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(length, length) bucket of key position minus query position, bidirectional, as T5 bins it.

  Half the buckets per direction are exact offsets, the other half log-spaced up to max_distance;
  the log branch is evaluated in float32 like transformers so the integer buckets agree exactly.
  """
  pos = np.arange(length, dtype=np.int64)
  relative = pos[None, :] - pos[:, None]
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
  large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                       * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return buckets + np.where(distance < max_exact, distance, large)


class _Factory:

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.cfg, self.rngs = cfg, rngs
    self.dtype, self.param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

  def dense(self, n_in: int, n_out: int, axes) -> Dense:
    return Dense(n_in, n_out, axes=axes, rngs=self.rngs, use_bias=False, dtype=self.dtype,
                 param_dtype=self.param_dtype)

  def norm(self) -> RMSNorm:
    return RMSNorm(self.cfg.d_model, eps=self.cfg.layer_norm_epsilon, axes=("embed",), param_dtype=self.param_dtype,
                   dtype=self.dtype)


class T5Attention(nnx.Module):
  """Self-attention without logit scaling, the stack's relative position bias added to the logits."""

  def __init__(self, f: _Factory):
    cfg = f.cfg
    self.cfg = cfg
    self.q = f.dense(cfg.d_model, cfg.inner_dim, ("embed", "heads"))
    self.k = f.dense(cfg.d_model, cfg.inner_dim, ("embed", "heads"))
    self.v = f.dense(cfg.d_model, cfg.inner_dim, ("embed", "heads"))
    self.o = f.dense(cfg.inner_dim, cfg.d_model, ("heads", "embed"))

  def __call__(self, x: jax.Array, bias: jax.Array, kv_valid: jax.Array | None) -> jax.Array:
    def heads(h):
      h = h.reshape(h.shape[:-1] + (self.cfg.num_heads, self.cfg.d_kv))
      return shd.constrain(h, ("batch", "seq", "heads", "kv"))

    out = attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), kv_valid=kv_valid, bias=bias, scale=1.0,
                    implementation=self.cfg.attention_impl, where="T5 attention")
    return self.o(out.reshape(out.shape[:2] + (-1,)))


class T5LayerSelfAttention(nnx.Module):

  def __init__(self, f: _Factory):
    self.SelfAttention = T5Attention(f)
    self.layer_norm = f.norm()

  def __call__(self, x, bias, kv_valid):
    return x + self.SelfAttention(self.layer_norm(x), bias, kv_valid)


class T5DenseGatedActDense(nnx.Module):
  """(gelu_tanh(x wi_0) * x wi_1) wo."""

  def __init__(self, f: _Factory):
    cfg = f.cfg
    self.wi_0 = f.dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"))
    self.wi_1 = f.dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"))
    self.wo = f.dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"))

  def __call__(self, x):
    h = shd.constrain(gelu_tanh(self.wi_0(x)) * self.wi_1(x), ("batch", "seq", "mlp"))
    return self.wo(h)


class T5LayerFF(nnx.Module):

  def __init__(self, f: _Factory):
    self.DenseReluDense = T5DenseGatedActDense(f)
    self.layer_norm = f.norm()

  def __call__(self, x):
    return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):

  def __init__(self, f: _Factory):
    self.layer = nnx.List([T5LayerSelfAttention(f), T5LayerFF(f)])

  def __call__(self, x, bias, kv_valid):
    x = self.layer[1](self.layer[0](x, bias, kv_valid))
    return shd.constrain(x, ("batch", "seq", "act_embed"))


class T5Stack(nnx.Module):

  def __init__(self, f: _Factory):
    self.cfg = f.cfg
    self.relative_attention_bias = Embed(f.cfg.relative_attention_num_buckets, f.cfg.num_heads, axes=(None, "heads"),
                                         rngs=f.rngs, param_dtype=f.param_dtype, dtype=jnp.float32)
    self.block = StackedBlocks([T5Block(f) for _ in range(f.cfg.num_layers)], "encoder.block")
    self.final_layer_norm = f.norm()

  def position_bias(self, length: int) -> jax.Array:
    """(1, heads, length, length) float32 bias shared by every block."""
    buckets = relative_position_buckets(length, self.cfg.relative_attention_num_buckets,
                                        self.cfg.relative_attention_max_distance)
    return self.relative_attention_bias(jnp.asarray(buckets)).transpose(2, 0, 1)[None]


class T5EncoderModel(nnx.Module):

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    f = _Factory(cfg, rngs)
    self.cfg = cfg
    self.shared = Embed(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), rngs=rngs, param_dtype=f.param_dtype,
                        dtype=f.dtype)
    self.encoder = T5Stack(f)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """(B, L) ids and optional (B, L) padding mask (1 = token) -> last_hidden_state (B, L, d_model).

    Without a mask every position is attended to, padding included (what FLUX's pipeline does).
    """
    input_ids = shd.constrain(input_ids, ("batch", "seq"))
    x = shd.constrain(self.shared(input_ids), ("batch", "seq", "act_embed"))
    bias = self.encoder.position_bias(input_ids.shape[-1])
    kv_valid = None if attention_mask is None else attention_mask.astype(bool)
    x = self.encoder.block.scan(lambda block, x, _: block(x, bias, kv_valid), x)
    return self.encoder.final_layer_norm(x)


def _embedding_source(reader: wio.SafetensorsReader, folder: str) -> tuple[tuple[wio.WeightRule, ...], set[str]]:
  """(weight table, names to skip): read the tied embedding from whichever name the checkpoint uses.

  When both names are stored they must hold the same table, so skipping one drops nothing.
  """
  if SHARED_EMBEDDING not in reader and ENCODER_EMBEDDING in reader:
    return (wio.WeightRule(r"shared\.embedding", ENCODER_EMBEDDING),) + T5_WEIGHTS, set()
  if SHARED_EMBEDDING in reader and ENCODER_EMBEDDING in reader:
    if reader.shape(SHARED_EMBEDDING) != reader.shape(ENCODER_EMBEDDING) or not np.array_equal(
        reader.read(SHARED_EMBEDDING), reader.read(ENCODER_EMBEDDING)):
      raise wio.CheckpointError(f"{folder}: {SHARED_EMBEDDING} and {ENCODER_EMBEDDING} differ; T5's input "
                                f"embedding is one tied table")
    return T5_WEIGHTS, {ENCODER_EMBEDDING}
  return T5_WEIGHTS, set()


def load_t5_encoder(folder: str, *, dtype: str = "float32", param_dtype: str | None = None,
                    mesh=None, rules=shd.DEFAULT_RULES, attention_impl: str = "auto") -> T5EncoderModel:
  """Read a transformers T5EncoderModel folder (or a pipeline's text_encoder_2/) into its target sharding."""
  folder = wio.model_folder(folder, "text_encoder_2")
  cfg = T5Config.from_transformers_config(wio.read_config(folder), source=os.path.join(folder, "config.json"),
                                          dtype=dtype, param_dtype=param_dtype or dtype,
                                          attention_impl=attention_impl)
  abstract = nnx.eval_shape(lambda: T5EncoderModel(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  reader = wio.SafetensorsReader.from_folder(folder)
  table, skipped = _embedding_source(reader, folder)
  state = wio.load_state(abstract_state, reader, table, source=folder, mesh=mesh, rules=rules,
                         allow_unused=skipped.__contains__)
  return nnx.merge(graphdef, state)
