"""CLIP text encoder, equal to transformers' `CLIPTextModel` (FLUX uses its pooled output).

Pre-norm transformer with a causal mask, quick-gelu MLP and a final layer norm. The pooled output is
the final hidden state at the end-of-text token, found exactly as transformers finds it (see
`pooled_positions`). Module names follow transformers so the weight table stays short.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.attention import attention, check_implementation
from editr1_jax.layers import Dense, Embed, LayerNorm, StackedBlocks

# transformers' configs before PR #24773 say eos_token_id 2 (FLUX's text_encoder does); the model then
# pools at the highest token id, which is the end-of-text token in CLIP's vocabulary.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  eos_token_id: int = LEGACY_EOS_TOKEN_ID
  # runtime, not architecture
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"  # one of attention.IMPLEMENTATIONS (editr1_jax/attention.py)

  def __post_init__(self):
    check_implementation(self.attention_impl)
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                       f"{self.num_attention_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  _TRANSFORMERS_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "max_position_embeddings", "layer_norm_eps", "eos_token_id")

  @classmethod
  def from_transformers_config(cls, config: dict, *, source: str = "config", **runtime) -> "CLIPTextConfig":
    act = config.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
      raise ValueError(f"{source}: hidden_act {act!r} is not supported (CLIP-L uses 'quick_gelu')")
    if not isinstance(config.get("eos_token_id", LEGACY_EOS_TOKEN_ID), int):
      raise ValueError(f"{source}: eos_token_id must be one integer, got {config['eos_token_id']!r}")
    return cls(**wio.config_fields(cls, config, cls._TRANSFORMERS_KEYS, source), **runtime)


def clip_l(**runtime) -> CLIPTextConfig:
  """FLUX's text_encoder (openai/clip-vit-large-patch14 text tower): 123,060,480 parameters."""
  return CLIPTextConfig(**runtime)


def tiny(**runtime) -> CLIPTextConfig:
  return CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16, **runtime)


# Our parameter path (regex) -> transformers tensor name (without the legacy `text_model.` prefix), layout.
CLIP_WEIGHTS = (
    wio.WeightRule(r"(.*)\.embedding", r"\1.weight"),
    wio.WeightRule(r"(.*)\.kernel", r"\1.weight", "linear"),
    wio.WeightRule(r"(.*)\.scale", r"\1.weight"),
    wio.WeightRule(r"(.*)\.bias", r"\1.bias"),
)
# transformers 4 nested the model under `text_model.` (FLUX's checkpoint); transformers 5 saves it flat.
CLIP_PREFIXES = ("text_model.",)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Index of the pooled token per row, as transformers' CLIPTextModel picks it.

  Legacy configs (eos_token_id == 2): the first position of the highest id. Otherwise: the first
  position holding eos_token_id (0 when there is none, as torch's argmax of all-false gives).
  """
  ids = input_ids.astype(jnp.int32)
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class _Factory:

  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
    self.cfg, self.rngs = cfg, rngs
    self.dtype, self.param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

  def dense(self, n_in: int, n_out: int, axes) -> Dense:
    return Dense(n_in, n_out, axes=axes, rngs=self.rngs, dtype=self.dtype, param_dtype=self.param_dtype)

  def norm(self) -> LayerNorm:
    return LayerNorm(self.cfg.hidden_size, eps=self.cfg.layer_norm_eps, axes=("embed",),
                     param_dtype=self.param_dtype, dtype=self.dtype)

  def embed(self, num: int, axes) -> Embed:
    return Embed(num, self.cfg.hidden_size, axes=axes, rngs=self.rngs, param_dtype=self.param_dtype,
                 dtype=self.dtype)


class Embeddings(nnx.Module):

  def __init__(self, f: _Factory):
    self.token_embedding = f.embed(f.cfg.vocab_size, ("vocab", "embed"))
    self.position_embedding = f.embed(f.cfg.max_position_embeddings, (None, "embed"))
    self.max_positions = f.cfg.max_position_embeddings

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    n = input_ids.shape[-1]
    if n > self.max_positions:
      raise ValueError(f"CLIP input has {n} tokens; the model has {self.max_positions} positions")
    return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(n))[None]


class SelfAttention(nnx.Module):

  def __init__(self, f: _Factory):
    dim = f.cfg.hidden_size
    self.cfg = f.cfg
    self.q_proj = f.dense(dim, dim, ("embed", "heads"))
    self.k_proj = f.dense(dim, dim, ("embed", "heads"))
    self.v_proj = f.dense(dim, dim, ("embed", "heads"))
    self.out_proj = f.dense(dim, dim, ("heads", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    def heads(h):
      h = h.reshape(h.shape[:-1] + (self.cfg.num_attention_heads, self.cfg.head_dim))
      return shd.constrain(h, ("batch", "seq", "heads", "kv"))

    out = attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), causal=True,
                    implementation=self.cfg.attention_impl, where="CLIP attention")
    return self.out_proj(out.reshape(out.shape[:2] + (-1,)))


class MLP(nnx.Module):

  def __init__(self, f: _Factory):
    self.fc1 = f.dense(f.cfg.hidden_size, f.cfg.intermediate_size, ("embed", "mlp"))
    self.fc2 = f.dense(f.cfg.intermediate_size, f.cfg.hidden_size, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(shd.constrain(quick_gelu(self.fc1(x)), ("batch", "seq", "mlp")))


class EncoderLayer(nnx.Module):

  def __init__(self, f: _Factory):
    self.layer_norm1 = f.norm()
    self.self_attn = SelfAttention(f)
    self.layer_norm2 = f.norm()
    self.mlp = MLP(f)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    x = x + self.mlp(self.layer_norm2(x))
    return shd.constrain(x, ("batch", "seq", "act_embed"))


class Encoder(nnx.Module):

  def __init__(self, f: _Factory):
    self.layers = StackedBlocks([EncoderLayer(f) for _ in range(f.cfg.num_hidden_layers)], "encoder.layers")


class CLIPTextModel(nnx.Module):

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    f = _Factory(cfg, rngs)
    self.cfg = cfg
    self.embeddings = Embeddings(f)
    self.encoder = Encoder(f)
    self.final_layer_norm = f.norm()

  def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, L) token ids -> (last_hidden_state (B, L, D), pooled (B, D))."""
    input_ids = shd.constrain(input_ids, ("batch", "seq"))
    x = shd.constrain(self.embeddings(input_ids), ("batch", "seq", "act_embed"))
    x = self.encoder.layers.scan(lambda layer, x, _: layer(x), x)
    x = self.final_layer_norm(x)
    pos = pooled_positions(input_ids, self.cfg.eos_token_id)
    pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
    return x, pooled


def load_clip_text(folder: str, *, dtype: str = "float32", param_dtype: str | None = None,
                   mesh=None, rules=shd.DEFAULT_RULES, attention_impl: str = "auto") -> CLIPTextModel:
  """Read a transformers CLIPTextModel folder (or a pipeline's text_encoder/) into its target sharding."""
  folder = wio.model_folder(folder, "text_encoder")
  cfg = CLIPTextConfig.from_transformers_config(wio.read_config(folder), source=os.path.join(folder, "config.json"),
                                                dtype=dtype, param_dtype=param_dtype or dtype,
                                                attention_impl=attention_impl)
  abstract = nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  state = wio.load_state(abstract_state, wio.SafetensorsReader.from_folder(folder), CLIP_WEIGHTS, source=folder,
                         mesh=mesh, rules=rules, strip_prefixes=CLIP_PREFIXES)
  return nnx.merge(graphdef, state)
