"""FLUX autoencoder, equal to diffusers' `AutoencoderKL` (16 latent channels, no quant convs).

NHWC throughout, images in [-1, 1]. `encode` returns the posterior mean (the "mode") in raw latent
space and `decode` maps raw latents back to images; the FLUX shift/scale normalisation lives in
`LatentNorm`, outside both. GroupNorm statistics and the mid-block softmax run in float32 whatever
the compute dtype. Module and parameter names follow diffusers so the weight table stays short.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.attention import attention, check_implementation
from editr1_jax.layers import Dense

# Main activations: (batch, height, width, channels).
_ACT = ("batch", None, None, "act_embed")


@dataclasses.dataclass(frozen=True)
class LatentNorm:
  """FLUX's latent normalisation: the transformer sees (z - shift) * scale; decoding inverts it."""

  shift: float
  scale: float

  def normalize(self, z: jax.Array) -> jax.Array:
    return (z - self.shift) * self.scale

  def denormalize(self, z: jax.Array) -> jax.Array:
    return z / self.scale + self.shift


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  shift_factor: float = 0.1159
  scaling_factor: float = 0.3611
  # runtime, not architecture
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  attention_impl: str = "auto"  # one of attention.IMPLEMENTATIONS (editr1_jax/attention.py)

  def __post_init__(self):
    check_implementation(self.attention_impl)
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"block_out_channels {self.block_out_channels}: {bad} not divisible by norm_num_groups "
                       f"{self.norm_num_groups}")

  @property
  def latent_norm(self) -> LatentNorm:
    return LatentNorm(self.shift_factor, self.scaling_factor)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def replace(self, **kw) -> "AutoencoderConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_diffusers_config(cls, config: dict, *, source: str = "config", **runtime) -> "AutoencoderConfig":
    """Reads an `AutoencoderKL` config.json; any setting this port does not implement is an error."""
    for field in ("block_out_channels", "latent_channels", "shift_factor", "scaling_factor"):
      if config.get(field) is None:
        raise wio.CheckpointError(f"{source}: field {field!r} is missing or null")
    kw = wio.config_fields(cls, config, ("in_channels", "out_channels", "latent_channels", "block_out_channels",
                                         "layers_per_block", "norm_num_groups", "shift_factor", "scaling_factor"),
                           source, required=False)
    n = len(kw["block_out_channels"])
    # field -> the value we implement (diffusers' default applies where the field is absent)
    required = {"act_fn": ("silu", "silu"), "use_quant_conv": (False, True), "use_post_quant_conv": (False, True),
                "mid_block_add_attention": (True, True), "down_block_types": (["DownEncoderBlock2D"] * n, None),
                "up_block_types": (["UpDecoderBlock2D"] * n, None)}
    for field, (want, default) in required.items():
      got = config.get(field, default)
      if got != want:
        raise wio.CheckpointError(f"{source}: field {field!r} is {got!r}; this port implements {want!r}")
    try:
      return cls(**kw, **runtime)
    except ValueError as e:
      raise wio.CheckpointError(f"{source}: {e}") from e


def flux(**runtime) -> AutoencoderConfig:
  """The FLUX.1 VAE: 83,819,683 parameters."""
  return AutoencoderConfig(**runtime)


def tiny(**runtime) -> AutoencoderConfig:
  """4 latent channels, so its packed tokens fit `flux.tiny()` (in_channels 16)."""
  return AutoencoderConfig(latent_channels=4, block_out_channels=(8, 16, 16), norm_num_groups=4, **runtime)


# --------------------------------------------------------------------------------------------------
# Weight table: our parameter path (regex) -> diffusers tensor name, layout. First match wins.
AUTOENCODER_WEIGHTS = (
    wio.WeightRule(r"(.*\.attentions\.\d+)\.to_out\.kernel", r"\1.to_out.0.weight", "linear"),
    wio.WeightRule(r"(.*\.attentions\.\d+)\.to_out\.bias", r"\1.to_out.0.bias"),
    wio.WeightRule(r"(.*\.attentions\.\d+\.to_[qkv])\.kernel", r"\1.weight", "linear"),
    wio.WeightRule(r"(.*)\.scale", r"\1.weight"),
    wio.WeightRule(r"(.*)\.kernel", r"\1.weight", "conv2d"),
    wio.WeightRule(r"(.*)\.bias", r"\1.bias"),
)


class _Factory:
  """Builds layers with the config's dtypes."""

  def __init__(self, cfg: AutoencoderConfig, rngs: nnx.Rngs):
    self.cfg, self.rngs = cfg, rngs
    self.dtype, self.param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

  def conv(self, n_in: int, n_out: int, *, size: int = 3, stride: int = 1, padding=((1, 1), (1, 1))) -> "Conv":
    return Conv(n_in, n_out, size=size, stride=stride, padding=padding, rngs=self.rngs, dtype=self.dtype,
                param_dtype=self.param_dtype)

  def norm(self, channels: int) -> "GroupNorm":
    return GroupNorm(channels, self.cfg.norm_num_groups, dtype=self.dtype, param_dtype=self.param_dtype)


class Conv(nnx.Module):
  """NHWC 2-D convolution; kernel (kh, kw, in, out)."""

  def __init__(self, n_in: int, n_out: int, *, size: int, stride: int, padding, rngs: nnx.Rngs, dtype, param_dtype):
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (size, size, n_in, n_out), param_dtype),
                            logical_axes=(None, None, "conv_in", "conv_out"))
    self.bias = nnx.Param(jnp.zeros((n_out,), param_dtype), logical_axes=("conv_out",))
    self.stride, self.padding, self.dtype = stride, padding, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                     (self.stride, self.stride), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm over the channel axis (last), eps 1e-6, two-pass statistics in float32.

  Each pass reduces over positions per channel, then sums the channels of a group: a plain
  axis-1 reduction that XLA runs ~3x faster on CPU than one over a (positions, group) reshape.
  """

  def __init__(self, channels: int, groups: int, *, dtype, param_dtype, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype), logical_axes=("conv_out",))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), logical_axes=("conv_out",))
    self.groups, self.eps, self.dtype = groups, eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    flat = x.astype(jnp.float32).reshape(b, -1, c)
    per_group = c // self.groups
    count = flat.shape[1] * per_group

    def group_mean(channel_sums):  # (B, C) -> (B, 1, C): the mean of each channel's group
      means = channel_sums.reshape(b, self.groups, per_group).sum(-1) / count
      return jnp.repeat(means, per_group, axis=-1)[:, None]

    centered = flat - group_mean(flat.sum(axis=1))
    y = centered * jax.lax.rsqrt(group_mean(jnp.square(centered).sum(axis=1)) + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.reshape(x.shape).astype(self.dtype)


class ResnetBlock(nnx.Module):
  """diffusers ResnetBlock2D without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

  def __init__(self, f: _Factory, n_in: int, n_out: int):
    self.norm1 = f.norm(n_in)
    self.conv1 = f.conv(n_in, n_out)
    self.norm2 = f.norm(n_out)
    self.conv2 = f.conv(n_out, n_out)
    self.conv_shortcut = f.conv(n_in, n_out, size=1, padding=((0, 0), (0, 0))) if n_in != n_out else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return shd.constrain(shortcut + h, _ACT)


class MidAttention(nnx.Module):
  """The mid-block self-attention: one head over all H*W positions, residual; diffusers' Linear q/k/v/out."""

  def __init__(self, f: _Factory, channels: int):
    def dense():
      return Dense(channels, channels, axes=("conv_in", "conv_out"), rngs=f.rngs, dtype=f.dtype,
                   param_dtype=f.param_dtype)

    self.group_norm = f.norm(channels)
    self.to_q, self.to_k, self.to_v, self.to_out = dense(), dense(), dense(), dense()
    self.impl = f.cfg.attention_impl

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    seq = self.group_norm(x).reshape(b, h * w, 1, c)
    out = attention(self.to_q(seq), self.to_k(seq), self.to_v(seq), implementation=self.impl,
                    where="VAE mid-block attention")
    return x + self.to_out(out).reshape(b, h, w, c)


class MidBlock(nnx.Module):
  """resnet -> attention -> resnet at the lowest resolution."""

  def __init__(self, f: _Factory, channels: int):
    self.resnets = nnx.List([ResnetBlock(f, channels, channels) for _ in range(2)])
    self.attentions = nnx.List([MidAttention(f, channels)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    return self.resnets[1](self.attentions[0](x))


class Downsample(nnx.Module):
  """Pad one row/column at the bottom/right, then a stride-2 3x3 conv (diffusers Downsample2D, padding 0)."""

  def __init__(self, f: _Factory, channels: int):
    self.conv = f.conv(channels, channels, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour 2x, then a 3x3 conv (diffusers Upsample2D)."""

  def __init__(self, f: _Factory, channels: int):
    self.conv = f.conv(channels, channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return self.conv(x)


class DownBlock(nnx.Module):
  """diffusers DownEncoderBlock2D."""

  def __init__(self, f: _Factory, n_in: int, n_out: int, *, downsample: bool):
    self.resnets = nnx.List([ResnetBlock(f, n_in if i == 0 else n_out, n_out) for i in range(f.cfg.layers_per_block)])
    self.downsamplers = nnx.List([Downsample(f, n_out)] if downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in list(self.resnets) + list(self.downsamplers):
      x = layer(x)
    return x


class UpBlock(nnx.Module):
  """diffusers UpDecoderBlock2D: one resnet more than the encoder's blocks."""

  def __init__(self, f: _Factory, n_in: int, n_out: int, *, upsample: bool):
    self.resnets = nnx.List(
        [ResnetBlock(f, n_in if i == 0 else n_out, n_out) for i in range(f.cfg.layers_per_block + 1)])
    self.upsamplers = nnx.List([Upsample(f, n_out)] if upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in list(self.resnets) + list(self.upsamplers):
      x = layer(x)
    return x


class Encoder(nnx.Module):

  def __init__(self, f: _Factory):
    cfg, widths = f.cfg, f.cfg.block_out_channels
    self.conv_in = f.conv(cfg.in_channels, widths[0])
    self.down_blocks = nnx.List([
        DownBlock(f, widths[max(i - 1, 0)], widths[i], downsample=i < len(widths) - 1) for i in range(len(widths))])
    self.mid_block = MidBlock(f, widths[-1])
    self.conv_norm_out = f.norm(widths[-1])
    self.conv_out = f.conv(widths[-1], 2 * cfg.latent_channels)  # mean and log-variance

  def __call__(self, x: jax.Array) -> jax.Array:
    x = shd.constrain(self.conv_in(x), _ACT)
    for block in self.down_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):

  def __init__(self, f: _Factory):
    cfg, widths = f.cfg, f.cfg.block_out_channels[::-1]
    self.conv_in = f.conv(cfg.latent_channels, widths[0])
    self.mid_block = MidBlock(f, widths[0])
    self.up_blocks = nnx.List([
        UpBlock(f, widths[max(i - 1, 0)], widths[i], upsample=i < len(widths) - 1) for i in range(len(widths))])
    self.conv_norm_out = f.norm(widths[-1])
    self.conv_out = f.conv(widths[-1], cfg.out_channels)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(shd.constrain(self.conv_in(z), _ACT))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Autoencoder(nnx.Module):
  """`encode(images) -> posterior mean`, `decode(latents) -> images`; raw latent space, NHWC."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    f = _Factory(cfg, rngs)
    self.cfg = cfg
    self.encoder = Encoder(f)
    self.decoder = Decoder(f)

  @property
  def latent_norm(self) -> LatentNorm:
    return self.cfg.latent_norm

  def encode(self, images: jax.Array) -> jax.Array:
    """(B, H, W, in_channels) in [-1, 1] -> (B, H/f, W/f, latent_channels), the Gaussian's mean."""
    return self.encoder(images)[..., :self.cfg.latent_channels]

  def decode(self, latents: jax.Array) -> jax.Array:
    """(B, h, w, latent_channels) raw latents -> (B, h*f, w*f, out_channels), nominally in [-1, 1]."""
    return self.decoder(latents)


# --------------------------------------------------------------------------------------------------
def load_autoencoder(folder: str, *, dtype: str = "float32", param_dtype: str | None = None,
                     attention_impl: str = "auto", mesh=None, rules=shd.DEFAULT_RULES) -> Autoencoder:
  """Read a diffusers AutoencoderKL folder, tensor by tensor, into its target sharding."""
  folder = wio.model_folder(folder, "vae")
  cfg = AutoencoderConfig.from_diffusers_config(wio.read_config(folder), source=os.path.join(folder, "config.json"),
                                                dtype=dtype, param_dtype=param_dtype or dtype,
                                                attention_impl=attention_impl)
  abstract = nnx.eval_shape(lambda: Autoencoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  state = wio.load_state(abstract_state, wio.SafetensorsReader.from_folder(folder), AUTOENCODER_WEIGHTS,
                         source=folder, mesh=mesh, rules=rules)
  return nnx.merge(graphdef, state)
