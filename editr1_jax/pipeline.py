"""FLUX.1-Kontext editing: source images + instructions -> edited images.

Equal to diffusers' `FluxKontextPipeline` without true CFG (true_cfg_scale 1): the source image is
encoded to reference latents (VAE posterior mode, normalised, packed), the instruction to T5 / CLIP
conditioning, the target starts from per-sample noise and is integrated by one of `sampling`'s
solvers on the schedule shifted for its token count, then decoded. One deliberate difference: by
default the output takes the (Kontext-resized) input's size; diffusers makes it 1024x1024 whatever
the input's aspect ratio. Rows are split over the mesh's data x fsdp axes where they divide.
"""

import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from editr1_jax import latents, sampling
from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.conditioning import MAX_T5_LENGTH, TextEncoders
from editr1_jax.layers import LoraSpec
from editr1_jax.models import autoencoder, flux


def scheduler_shift(folder: str) -> sampling.ShiftConfig:
  """The resolution-dependent shift of a pipeline folder's scheduler/scheduler_config.json."""
  path = os.path.join(folder, "scheduler", "scheduler_config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: scheduler config not found")
  with open(path) as f:
    return sampling.ShiftConfig.from_diffusers_config(json.load(f), source=path)


def lora_spec_of_file(path: str, alpha: float | None = None) -> LoraSpec:
  """Rank, alpha and target modules of a diffusers / peft LoRA file.

  Rank and alpha come from its `lora_adapter_metadata` (diffusers' `save_lora_weights` and our export
  write it); a file without one gives its rank through the tensor shapes and needs `alpha`.
  """
  reader = wio.SafetensorsReader([path])
  names = [n for n in reader.names() if ".lora_A." in n]
  if not names:
    raise wio.CheckpointError(f"{path}: no lora_A tensors, not a LoRA file")
  ranks = {reader.shape(n)[0] for n in names}
  if len(ranks) != 1:
    raise wio.CheckpointError(f"{path}: adapters of several ranks {sorted(ranks)}")
  rank = ranks.pop()
  modules = set()
  for n in names:
    module = n.split(".lora_A.")[0]
    for prefix in flux.LORA_PREFIXES:
      module = module.removeprefix(prefix)
    modules.add(module)
  config = json.loads(reader.metadata.get("lora_adapter_metadata", "{}"))
  if config.get("transformer.r", rank) != rank:
    raise wio.CheckpointError(f"{path}: metadata says rank {config['transformer.r']}, tensors have rank {rank}")
  alpha = config.get("transformer.lora_alpha", alpha)
  if alpha is None:
    raise ValueError(f"{path}: no lora_alpha in the file's metadata: give the alpha the adapter was trained with")
  flux.check_lora_targets(tuple(sorted(modules)), f"{path}: adapter")
  return LoraSpec(rank=rank, alpha=float(alpha), targets=tuple(sorted(modules)))


class KontextPipeline:
  """Transformer + VAE + text encoders of one FLUX.1-Kontext pipeline folder."""

  def __init__(self, transformer: flux.FluxTransformer, vae: autoencoder.Autoencoder, text: TextEncoders,
               shift: sampling.ShiftConfig = sampling.FLUX_SHIFT, *, mesh=None, rules=shd.DEFAULT_RULES):
    if transformer.cfg.in_channels != 4 * vae.cfg.latent_channels:
      raise ValueError(f"transformer in_channels {transformer.cfg.in_channels} must be 4 x the VAE's "
                       f"{vae.cfg.latent_channels} latent channels (2x2 packed tokens)")
    self.transformer, self.vae, self.text, self.shift = transformer, vae, text, shift
    self.mesh, self.rules = mesh, tuple(rules)
    self.multiple_of = 2 * vae.cfg.downsample_factor  # a VAE pixel block times the 2x2 packing
    self._encode = jax.jit(lambda vae, images: latents.reference_latents(vae, images)[0])
    self._decode = jax.jit(latents.decode_tokens, static_argnames=("height", "width"))

  @classmethod
  def from_folder(cls, folder: str, *, dtype: str = "float32", lora_weights: str | None = None,
                  lora_alpha: float | None = None, max_sequence_length: int = MAX_T5_LENGTH, mesh=None,
                  rules=shd.DEFAULT_RULES) -> "KontextPipeline":
    """A diffusers pipeline folder (transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/), with an
    optional LoRA file applied to the transformer."""
    lora = None if lora_weights is None else lora_spec_of_file(lora_weights, lora_alpha)
    transformer = flux.load_flux_transformer(folder, dtype=dtype, lora=lora, lora_weights=lora_weights, mesh=mesh,
                                             rules=rules)
    vae = autoencoder.load_autoencoder(folder, dtype=dtype, mesh=mesh, rules=rules)
    text = TextEncoders.from_pipeline(folder, dtype=dtype, max_sequence_length=max_sequence_length, mesh=mesh,
                                      rules=rules)
    return cls(transformer, vae, text, scheduler_shift(folder), mesh=mesh, rules=rules)

  def _rows(self, x) -> jax.Array:
    """Host rows -> a device array split over data x fsdp (as far as the row count divides)."""
    if self.mesh is None:
      return jnp.asarray(x)
    axes = ("batch",) + (None,) * (np.ndim(x) - 1)
    return jax.device_put(x, NamedSharding(self.mesh, shd.logical_to_spec(axes, self.rules, np.shape(x), self.mesh)))

  def condition(self, sources: np.ndarray, instructions: Sequence[str], *, grid: tuple[int, int],
                guidance: float) -> sampling.EditCondition:
    """Sources (B, H, W, 3) in [-1, 1], one instruction each, the target's packed grid -> conditioning."""
    if len(instructions) != len(sources):
      raise ValueError(f"{len(sources)} source images but {len(instructions)} instructions")
    f = self.multiple_of
    if sources.shape[1] % f or sources.shape[2] % f:
      raise ValueError(f"source images of {sources.shape[1]}x{sources.shape[2]} pixels: sides must be multiples "
                       f"of {f}")
    reference = self._encode(self.vae, self._rows(sources))
    text, pooled, txt_ids = self.text(list(instructions))
    ref_grid = (sources.shape[1] // f, sources.shape[2] // f)
    img_ids = np.concatenate([latents.target_ids(*grid), latents.reference_ids(*ref_grid)])
    return sampling.EditCondition(reference=reference, text=text, pooled=pooled,
                                  guidance=self._rows(np.full(len(sources), guidance, np.float32)),
                                  img_ids=jnp.asarray(img_ids), txt_ids=txt_ids)

  def rollout(self, cond: sampling.EditCondition, noise: jax.Array, num_steps: int, *, solver: str = "euler",
              keys: jax.Array | None = None, noise_level: float = 0.7,
              progress: Callable[[jax.Array], None] | None = None) -> sampling.Rollout:
    """Integrate from `noise` (B, L, 4 latent channels) over `num_steps` shifted steps."""
    sigmas = jnp.asarray(sampling.shifted_sigmas(num_steps, noise.shape[1], self.shift))
    with shd.use_mesh(self.mesh, self.rules):
      return sampling.kontext_rollout(self.transformer, cond, self._rows(noise), sigmas, keys, solver=solver,
                                      noise_level=noise_level, progress=progress)

  def decode(self, tokens: jax.Array, grid: tuple[int, int]) -> np.ndarray:
    """Packed target tokens on a rows x cols grid -> images (B, H, W, 3), nominally in [-1, 1]."""
    return np.asarray(self._decode(self.vae, tokens, height=2 * grid[0], width=2 * grid[1]))

  def __call__(self, sources, instructions: Sequence[str], *, height: int | None = None, width: int | None = None,
               num_steps: int = 28, guidance: float = 3.5, seed: int = 0, solver: str = "euler",
               auto_resize: bool = True, max_area: int | None = None, noise: np.ndarray | None = None,
               progress: Callable[[jax.Array], None] | None = None) -> tuple[np.ndarray, sampling.Rollout]:
    """Edit each source (path, PIL image or uint8 array) by its instruction -> (images in [-1, 1], rollout).

    Sources are resized as the Kontext pipeline does (`latents.inference_image`) and must then share one size.
    The output is height x width (default: the resized sources' size), rescaled to `max_area` pixels at that
    aspect ratio if given (diffusers always rescales, to 1024 ** 2 by default). Row b's noise (and its SDE
    noise) comes from fold_in(key(seed), b), unless `noise` is given.
    """
    images = [latents.inference_image(s, auto_resize) for s in sources]
    if len({im.shape for im in images}) != 1:
      raise ValueError(f"the sources resize to different sizes {sorted({im.shape[:2] for im in images})}; "
                       f"edit them in separate calls")
    sources = np.stack(images)
    height, width = height or sources.shape[1], width or sources.shape[2]
    if max_area is not None:
      height, width = latents.area_resolution(height, width, max_area)
    if height % self.multiple_of or width % self.multiple_of:
      raise ValueError(f"output size {height}x{width} must be a multiple of {self.multiple_of}")
    grid = (height // self.multiple_of, width // self.multiple_of)
    cond = self.condition(sources, instructions, grid=grid, guidance=guidance)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(len(sources)))
    if noise is None:
      shape = (grid[0] * grid[1], self.transformer.cfg.in_channels)
      noise = sampling.initial_noise(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys), shape)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    result = self.rollout(cond, noise, num_steps, solver=solver, keys=step_keys, progress=progress)
    return self.decode(result.x0, grid), result
