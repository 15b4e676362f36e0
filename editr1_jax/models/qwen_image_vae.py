"""Qwen-Image VAE on still images, equal to diffusers' `AutoencoderKLQwenImage` on one frame (T = 1).

The reference is a causal video VAE (Wan's, fine-tuned): every convolution is 3-D and pads time with zeros
*before* the clip only. A still image is the first (and only) chunk of that clip, so:

- a causal 3-D convolution sees zeros in every temporal tap but its last one: it equals a 2-D convolution with
  the kernel's last temporal slice;
- the temporal resamplers' `time_conv` is skipped on the first chunk (the reference only fills its feature
  cache there), so it never runs here; its weights are kept so the checkpoint maps one-to-one.

Parameters keep the reference's full shapes (3-D kernels, (C, 1, 1[, 1]) norm gains) and are sliced at call
time. NHWC throughout, images in [-1, 1]. `encode` returns the posterior mean in raw latent space; `decode`
returns images clamped to [-1, 1] as the reference does; the per-channel mean/std normalisation the pipeline
applies lives in `LatentNorm`, outside both. Norm statistics and the mid-block softmax run in float32.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.attention import attention, check_implementation
from editr1_jax.models.autoencoder import Conv

# Main activations: (batch, height, width, channels).
_ACT = ("batch", None, None, "act_embed")

# The released per-channel latent statistics (diffusers' defaults; the Qwen-Image(-Edit) vae/config.json).
_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class LatentNorm:
  """The pipeline's per-channel normalisation: the transformer sees (z - mean) / std; decoding inverts it."""

  mean: tuple[float, ...]
  std: tuple[float, ...]

  def normalize(self, z: jax.Array) -> jax.Array:
    """Channels last, in the latents' dtype (as the pipeline casts its statistics)."""
    z = jnp.asarray(z)
    return (z - jnp.asarray(self.mean, z.dtype)) / jnp.asarray(self.std, z.dtype)

  def denormalize(self, z: jax.Array) -> jax.Array:
    z = jnp.asarray(z)
    return z * jnp.asarray(self.std, z.dtype) + jnp.asarray(self.mean, z.dtype)


@dataclasses.dataclass(frozen=True)
class QwenImageVAEConfig:
  # diffusers' field names (its spelling of "temperal" included) so config.json reads field by field
  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temperal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder level; the decoder mirrors it
  input_channels: int = 3
  latents_mean: tuple[float, ...] = _LATENTS_MEAN
  latents_std: tuple[float, ...] = _LATENTS_STD
  # runtime, not architecture
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  attention_impl: str = "auto"  # one of attention.IMPLEMENTATIONS (editr1_jax/attention.py)

  def __post_init__(self):
    check_implementation(self.attention_impl)
    sizes = dict(base_dim=self.base_dim, z_dim=self.z_dim, num_res_blocks=self.num_res_blocks,
                 input_channels=self.input_channels, dim_mult=min(self.dim_mult, default=0))
    bad = [k for k, v in sizes.items() if v < 1]
    if bad:
      raise ValueError(f"{bad} must be positive")
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f"temperal_downsample has {len(self.temperal_downsample)} entries; dim_mult "
                       f"{self.dim_mult} has {len(self.dim_mult) - 1} downsampling levels")
    for name in ("latents_mean", "latents_std"):
      if len(getattr(self, name)) != self.z_dim:
        raise ValueError(f"{name} has {len(getattr(self, name))} entries, z_dim is {self.z_dim}")
    if min(self.latents_std) <= 0:
      raise ValueError(f"latents_std must be positive, got {self.latents_std}")

  @property
  def latent_norm(self) -> LatentNorm:
    return LatentNorm(self.latents_mean, self.latents_std)

  @property
  def downsample_factor(self) -> int:
    return 2 ** len(self.temperal_downsample)

  def replace(self, **kw) -> "QwenImageVAEConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_diffusers_config(cls, config: dict, *, source: str = "config", **runtime) -> "QwenImageVAEConfig":
    """Reads an `AutoencoderKLQwenImage` config.json (absent fields take diffusers' defaults, which are the
    released model); any setting this port does not implement is an error."""
    name = config.get("_class_name", "AutoencoderKLQwenImage")
    if name != "AutoencoderKLQwenImage":
      raise wio.CheckpointError(f"{source}: _class_name is {name!r}, not 'AutoencoderKLQwenImage'")
    if config.get("attn_scales", []) != []:  # attention inside the down blocks; never released
      raise wio.CheckpointError(f"{source}: field 'attn_scales' is {config['attn_scales']!r}; this port implements []")
    kw = wio.config_fields(cls, config, ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample",
                                         "input_channels", "latents_mean", "latents_std"), source, required=False)
    try:
      return cls(**kw, **runtime)
    except ValueError as e:
      raise wio.CheckpointError(f"{source}: {e}") from e


def qwen_image(**runtime) -> QwenImageVAEConfig:
  """The Qwen-Image / Qwen-Image-Edit(-2509) VAE: 126,892,531 parameters."""
  return QwenImageVAEConfig(**runtime)


def tiny(**runtime) -> QwenImageVAEConfig:
  """Every block kind of the real one (2-D and 3-D resamplers, channel changes, mid attention), 8x down."""
  return QwenImageVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), latents_mean=_LATENTS_MEAN[:4],
                            latents_std=_LATENTS_STD[:4], **runtime)


# --------------------------------------------------------------------------------------------------
# Weight table: our parameter path (regex) -> diffusers tensor name, layout. First match wins.
QWEN_IMAGE_VAE_WEIGHTS = (
    wio.WeightRule(r"(.*)\.resample\.kernel", r"\1.resample.1.weight", "conv2d"),  # nn.Sequential(pad|upsample, conv)
    wio.WeightRule(r"(.*)\.resample\.bias", r"\1.resample.1.bias"),
    wio.WeightRule(r"(.*\.(?:to_qkv|proj))\.kernel", r"\1.weight", "conv2d"),
    wio.WeightRule(r"(.*)\.kernel", r"\1.weight", "conv3d"),
    wio.WeightRule(r"(.*)\.(bias|gamma)", r"\1.\2"),
)


class CausalConv3d(nnx.Module):
  """The reference's causal 3-D convolution applied to a single frame.

  Time is padded with kt - 1 zero frames before the frame, so only the last temporal tap of the
  (kt, kh, kw, in, out) kernel meets data; spatial padding keeps the size (kh // 2 each side).
  """

  def __init__(self, n_in: int, n_out: int, *, size: tuple[int, int, int], rngs: nnx.Rngs, dtype, param_dtype):
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (*size, n_in, n_out), param_dtype),
                            logical_axes=(None, None, None, "conv_in", "conv_out"))
    self.bias = nnx.Param(jnp.zeros((n_out,), param_dtype), logical_axes=("conv_out",))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    _, kh, kw = self.kernel.shape[:3]
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[-1].astype(self.dtype), (1, 1),
                                     ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(self.dtype)


class ChannelRMSNorm(nnx.Module):
  """The reference's norm: x / max(||x||_2, 1e-12) * sqrt(C) * gamma over channels, no bias, in float32.

  Not layers.RMSNorm: the gain keeps the reference's (C, 1, 1[, 1]) shape and the epsilon clamps the
  norm instead of being added to the mean square.
  """

  def __init__(self, channels: int, *, images: bool, dtype, param_dtype):
    shape = (channels, 1, 1) if images else (channels, 1, 1, 1)
    self.gamma = nnx.Param(jnp.ones(shape, param_dtype), logical_axes=("conv_out",) + (None,) * (len(shape) - 1))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * (x.shape[-1] ** 0.5)
    return (y * self.gamma[...].reshape(-1).astype(jnp.float32)).astype(self.dtype)


class _Factory:
  """Builds layers with the config's dtypes."""

  def __init__(self, cfg: QwenImageVAEConfig, rngs: nnx.Rngs):
    self.cfg, self.rngs = cfg, rngs
    self.dtype, self.param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

  def causal(self, n_in: int, n_out: int, size: tuple[int, int, int] = (3, 3, 3)) -> CausalConv3d:
    return CausalConv3d(n_in, n_out, size=size, rngs=self.rngs, dtype=self.dtype, param_dtype=self.param_dtype)

  def conv2d(self, n_in: int, n_out: int, *, size: int = 3, stride: int = 1, padding=((1, 1), (1, 1))) -> Conv:
    return Conv(n_in, n_out, size=size, stride=stride, padding=padding, rngs=self.rngs, dtype=self.dtype,
                param_dtype=self.param_dtype)

  def norm(self, channels: int, *, images: bool = False) -> ChannelRMSNorm:
    return ChannelRMSNorm(channels, images=images, dtype=self.dtype, param_dtype=self.param_dtype)


class ResidualBlock(nnx.Module):
  """shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))); the shortcut is a 1x1x1 conv when widths differ."""

  def __init__(self, f: _Factory, n_in: int, n_out: int):
    self.norm1 = f.norm(n_in)
    self.conv1 = f.causal(n_in, n_out)
    self.norm2 = f.norm(n_out)
    self.conv2 = f.causal(n_out, n_out)
    self.conv_shortcut = f.causal(n_in, n_out, (1, 1, 1)) if n_in != n_out else None

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return shd.constrain(shortcut + h, _ACT)


class AttentionBlock(nnx.Module):
  """One-head self-attention over a frame's H*W positions, residual; q/k/v from one 1x1 conv."""

  def __init__(self, f: _Factory, channels: int):
    self.norm = f.norm(channels, images=True)
    self.to_qkv = f.conv2d(channels, 3 * channels, size=1, padding=((0, 0), (0, 0)))
    self.proj = f.conv2d(channels, channels, size=1, padding=((0, 0), (0, 0)))
    self.impl = f.cfg.attention_impl

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b, h * w, 1, 3 * c), 3, axis=-1)
    out = attention(q, k, v, implementation=self.impl, where="VAE mid-block attention")
    return x + self.proj(out.reshape(b, h, w, c))


class MidBlock(nnx.Module):
  """resnet -> attention -> resnet at the lowest resolution."""

  def __init__(self, f: _Factory, channels: int):
    self.resnets = nnx.List([ResidualBlock(f, channels, channels) for _ in range(2)])
    self.attentions = nnx.List([AttentionBlock(f, channels)])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Resample(nnx.Module):
  """2x spatial down (pad bottom/right, stride-2 3x3 conv) or up (nearest, 3x3 conv halving the width).

  The "3d" modes also hold the reference's temporal `time_conv`, which the first frame never reaches.
  """

  MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

  def __init__(self, f: _Factory, channels: int, mode: str):
    if mode not in self.MODES:
      raise ValueError(f"resample mode must be one of {self.MODES}, got {mode!r}")
    self.up = mode.startswith("up")
    if self.up:
      self.resample = f.conv2d(channels, channels // 2)
    else:
      self.resample = f.conv2d(channels, channels, stride=2, padding=((0, 1), (0, 1)))
    if mode.endswith("3d"):
      self.time_conv = f.causal(channels, 2 * channels if self.up else channels, (3, 1, 1))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.up:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.resample(x)


class UpBlock(nnx.Module):
  """num_res_blocks + 1 residual blocks, then an optional upsampler."""

  def __init__(self, f: _Factory, n_in: int, n_out: int, *, upsample: str | None):
    self.resnets = nnx.List(
        [ResidualBlock(f, n_in if i == 0 else n_out, n_out) for i in range(f.cfg.num_res_blocks + 1)])
    self.upsamplers = nnx.List([Resample(f, n_out, upsample)] if upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in list(self.resnets) + list(self.upsamplers):
      x = layer(x)
    return x


class Encoder(nnx.Module):
  """Images -> (mean, log-variance) features; `down_blocks` is the reference's flat list of resnets and resamplers."""

  def __init__(self, f: _Factory):
    cfg = f.cfg
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    self.conv_in = f.causal(cfg.input_channels, dims[0])
    layers = []
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
      for j in range(cfg.num_res_blocks):
        layers.append(ResidualBlock(f, n_in if j == 0 else n_out, n_out))
      if i < len(cfg.temperal_downsample):
        layers.append(Resample(f, n_out, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
    self.down_blocks = nnx.List(layers)
    self.mid_block = MidBlock(f, dims[-1])
    self.norm_out = f.norm(dims[-1])
    self.conv_out = f.causal(dims[-1], 2 * cfg.z_dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = shd.constrain(self.conv_in(x), _ACT)
    for layer in self.down_blocks:
      x = layer(x)
    return self.conv_out(jax.nn.silu(self.norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
  """Latents -> images (unclamped); every upsampler halves the width the next block starts from."""

  def __init__(self, f: _Factory):
    cfg = f.cfg
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temporal = cfg.temperal_downsample[::-1]
    self.conv_in = f.causal(cfg.z_dim, dims[0])
    self.mid_block = MidBlock(f, dims[0])
    self.up_blocks = nnx.List([
        UpBlock(f, dims[i] if i == 0 else dims[i] // 2, dims[i + 1],
                upsample=("upsample3d" if temporal[i] else "upsample2d") if i < len(temporal) else None)
        for i in range(len(dims) - 1)])
    self.norm_out = f.norm(dims[-1])
    self.conv_out = f.causal(dims[-1], cfg.input_channels)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(shd.constrain(self.conv_in(z), _ACT))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


def _check_shape(name: str, x, channels: int) -> None:
  if len(x.shape) != 4 or x.shape[-1] != channels:
    raise ValueError(f"{name} must be (batch, height, width, {channels}) channels-last still images, "
                     f"got shape {tuple(x.shape)}")


class QwenImageVAE(nnx.Module):
  """`encode(images) -> posterior mean`, `decode(latents) -> images`; raw latent space, NHWC, one frame."""

  def __init__(self, cfg: QwenImageVAEConfig, *, rngs: nnx.Rngs):
    f = _Factory(cfg, rngs)
    self.cfg = cfg
    self.encoder = Encoder(f)
    self.quant_conv = f.causal(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1))
    self.post_quant_conv = f.causal(cfg.z_dim, cfg.z_dim, (1, 1, 1))
    self.decoder = Decoder(f)

  @property
  def latent_norm(self) -> LatentNorm:
    return self.cfg.latent_norm

  def encode(self, images: jax.Array) -> jax.Array:
    """(B, H, W, input_channels) in [-1, 1] -> (B, H // 8, W // 8, z_dim), the Gaussian's mean."""
    _check_shape("images", images, self.cfg.input_channels)
    return self.quant_conv(self.encoder(images))[..., :self.cfg.z_dim]

  def decode(self, latents: jax.Array) -> jax.Array:
    """(B, h, w, z_dim) raw latents -> (B, 8h, 8w, input_channels), clamped to [-1, 1] like the reference."""
    _check_shape("latents", latents, self.cfg.z_dim)
    return jnp.clip(self.decoder(self.post_quant_conv(latents)), -1.0, 1.0)


# --------------------------------------------------------------------------------------------------
def load_qwen_image_vae(folder: str, *, dtype: str = "float32", param_dtype: str | None = None,
                        attention_impl: str = "auto", mesh=None, rules=shd.DEFAULT_RULES) -> QwenImageVAE:
  """Read a diffusers AutoencoderKLQwenImage folder (or a pipeline folder's `vae/`), tensor by tensor, into its
  target sharding."""
  folder = wio.model_folder(folder, "vae")
  cfg = QwenImageVAEConfig.from_diffusers_config(wio.read_config(folder), source=os.path.join(folder, "config.json"),
                                                 dtype=dtype, param_dtype=param_dtype or dtype,
                                                 attention_impl=attention_impl)
  abstract = nnx.eval_shape(lambda: QwenImageVAE(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  state = wio.load_state(abstract_state, wio.SafetensorsReader.from_folder(folder), QWEN_IMAGE_VAE_WEIGHTS,
                         source=folder, mesh=mesh, rules=rules)
  return nnx.merge(graphdef, state)
