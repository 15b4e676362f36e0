"""FLUX.1-Kontext as a model family: the FLUX transformer over [text | target | reference] tokens, the
FLUX VAE (2x2-packed 16-channel latents), CLIP-L pooled + T5 hidden states as text conditioning, a
resolution-shifted flow schedule read from the folder's scheduler config.

Equal to diffusers' `FluxKontextPipeline` without true CFG: reference latents are the normalised VAE
posterior mode, packed; reference token ids are (1, row, col), the target's (0, row, col).
"""

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editr1_jax import chunks, latents, sampling
from editr1_jax import sharding as shd
from editr1_jax.conditioning import MAX_T5_LENGTH, TextEncoders, encode_prompts
from editr1_jax.families.base import family_from_config, lora_spec, policy_from_config, register, \
  scheduler_shift
from editr1_jax.families.base import runtime as family_runtime
from editr1_jax.layers import AdapterRows, LoraSpec
from editr1_jax.models import autoencoder, clip, flux, t5


@flax.struct.dataclass
class KontextCondition:
  """Everything the Kontext transformer sees besides the noisy target latent, batched over rows."""

  reference: jax.Array  # (B, Lr, C) packed, normalised reference-image latents
  text: jax.Array  # (B, Lt, D) T5 hidden states
  pooled: jax.Array  # (B, P) CLIP pooled output
  guidance: jax.Array  # (B,) guidance-embedding value
  img_ids: jax.Array  # (L + Lr, 3): target ids, then reference ids
  txt_ids: jax.Array  # (Lt, 3)

  @staticmethod
  def logical_axes() -> "KontextCondition":
    return KontextCondition(("batch", "seq", None), ("batch", "seq", None), ("batch", None), ("batch",), (None, None),
                            (None, None))


def velocity(model, z: jax.Array, sigma: jax.Array, cond: KontextCondition,
             adapters: AdapterRows | None = None) -> jax.Array:
  """The Kontext transformer as a velocity field on the target tokens: reference tokens appended, output cut back.

  `sigma` is the flow time in [0, 1] (scalar or (B,)); FLUX scales it by 1000 itself.
  """
  n = z.shape[1]
  hidden = jnp.concatenate([z, cond.reference.astype(z.dtype)], axis=1)
  out = model(hidden_states=hidden, encoder_hidden_states=cond.text, pooled_projections=cond.pooled,
              timestep=sigma, img_ids=cond.img_ids, txt_ids=cond.txt_ids, guidance=cond.guidance, adapters=adapters)
  return out[:, :n]


@register("kontext")
class Kontext:
  """A FLUX.1-Kontext pipeline's transformer, VAE and text encoders, and what the method needs of them."""

  name = "kontext"
  pipeline_classes = ("FluxKontextPipeline",)  # model_index.json `_class_name`s of its folders
  check_lora_targets = staticmethod(flux.check_lora_targets)
  check_config = staticmethod(lambda config: None)  # every guidance value is a guidance embedding
  velocity = staticmethod(velocity)
  weight_table, lora_weight_table = flux.FLUX_WEIGHTS, flux.FLUX_LORA_WEIGHTS
  lora_prefixes = flux.LORA_PREFIXES
  # How the benchmark reproductions sample FLUX.1-Kontext-dev (GEdit-Bench, ImgEdit): the diffusers pipeline's
  # defaults, 28 Euler steps at guidance 3.5, inputs at Kontext's training resolutions (`inference_image`).
  benchmark_sampling = {"steps": 28, "guidance": 3.5, "sampler": "euler"}

  def __init__(self, transformer: flux.FluxTransformer, vae: autoencoder.Autoencoder, text: TextEncoders,
               shift: sampling.ShiftConfig = sampling.FLUX_SHIFT, *, mesh=None, rules=shd.DEFAULT_RULES,
               chunk: int | None = None, prompt_cache_entries: int = 4096):
    """`chunk`: rows per encoding call (default: all rows of a call at once)."""
    if transformer.cfg.in_channels != 4 * vae.cfg.latent_channels:
      raise ValueError(f"transformer in_channels {transformer.cfg.in_channels} must be 4 x the VAE's "
                       f"{vae.cfg.latent_channels} latent channels (2x2 packed tokens)")
    self.transformer, self.vae, self.text, self.shift = transformer, vae, text, shift
    self.mesh, self.rules, self.chunk = mesh, tuple(rules), chunk
    # instruction -> (T5 hidden states, CLIP pooled), computed once per instruction (LRU-bounded)
    self.prompts = chunks.RowCache(lambda prompts: text(prompts)[:2], prompt_cache_entries)
    self.multiple_of = 2 * vae.cfg.downsample_factor  # a VAE pixel block times the 2x2 packing
    self._encode = jax.jit(lambda vae, images: latents.reference_latents(vae, images)[0])
    self._decode = jax.jit(latents.decode_tokens, static_argnames=("height", "width"))

  # building ---------------------------------------------------------------------------------------
  @classmethod
  def from_folder(cls, folder: str, *, dtype: str = "float32", param_dtype: str | None = None,
                  lora: LoraSpec | None = None, lora_weights: str | None = None, remat: str = "none",
                  attention_impl: str = "auto", scan_blocks: bool = True, max_sequence_length: int = MAX_T5_LENGTH,
                  mesh=None, rules=shd.DEFAULT_RULES, seed: int = 0, **kw) -> "Kontext":
    """A diffusers pipeline folder (transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/)."""
    transformer = flux.load_flux_transformer(folder, dtype=dtype, param_dtype=param_dtype, lora=lora,
                                             lora_weights=lora_weights, remat=remat, attention_impl=attention_impl,
                                             scan_blocks=scan_blocks, mesh=mesh, rules=rules, seed=seed)
    vae = autoencoder.load_autoencoder(folder, dtype=dtype, mesh=mesh, rules=rules, attention_impl=attention_impl)
    text = TextEncoders.from_pipeline(folder, dtype=dtype, max_sequence_length=max_sequence_length, mesh=mesh,
                                      rules=rules, attention_impl=attention_impl)
    return cls(transformer, vae, text, scheduler_shift(folder), mesh=mesh, rules=rules, **kw)

  @classmethod
  def tiny(cls, seed: int = 0, *, lora: LoraSpec | None = None, max_sequence_length: int = 16, mesh=None,
           rules=shd.DEFAULT_RULES, dtype: str = "float32", param_dtype: str | None = None, remat: str = "none",
           attention_impl: str = "auto", scan_blocks: bool = True, **kw) -> "Kontext":
    """Small random models drawn from `seed`, sized to the shipped tiny tokenizers (the CPU demo, tests);
    FLUX's default schedule."""
    from editr1_jax import tiny
    transformer = tiny.tiny_transformer(seed, lora, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype,
                                        remat=remat, attention_impl=attention_impl, scan_blocks=scan_blocks)
    return cls(transformer, tiny.tiny_vae(seed, mesh=mesh, rules=rules, attention_impl=attention_impl),
               tiny.tiny_text_encoders(seed, max_sequence_length, mesh=mesh, rules=rules,
                                       attention_impl=attention_impl), mesh=mesh, rules=rules, **kw)

  @classmethod
  def from_config(cls, config, mesh=None, rules=None) -> "Kontext":
    """`config.model.preset` "tiny" (built in code) or "" (read from `config.model.pipeline_dir`)."""
    return family_from_config(cls, config, mesh, rules, max_sequence_length=config.data.t5_max_length)

  @staticmethod
  def transformer_from_config(config, mesh=None, rules=shd.DEFAULT_RULES):
    """The policy network alone (what an export needs), with the config's LoRA unless fully fine-tuned."""
    from editr1_jax import tiny
    return policy_from_config(config, mesh, rules, tiny.tiny_transformer, flux.load_flux_transformer)

  @classmethod
  def abstract_parts(cls, config, layers: tuple[int, int] | None = None):
    """What ahead-of-time planning needs from the config alone, nothing allocated: (a transformer constructor,
    `condition(rows, mesh, rules)` -> abstract condition rows, the token grid, the latent channels); the tiny
    preset's sizes or FLUX.1-Kontext-dev's; `layers` (double, single) overrides the depth."""
    runtime = dict(family_runtime(config), lora=lora_spec(config))
    if config.model.preset == "tiny":
      from editr1_jax import tiny
      cfg, vae, compute = tiny.tiny_flux_config(**runtime), autoencoder.tiny(), "float32"  # tiny encoders: float32
    else:
      cfg, vae, compute = flux.kontext_dev(**runtime), autoencoder.flux(), config.model.dtype
    if layers is not None:
      cfg = cfg.replace(num_layers=layers[0], num_single_layers=layers[1])
    f = 2 * vae.downsample_factor
    if config.data.resolution % f:
      raise ValueError(f"config.data.resolution = {config.data.resolution}: must be a multiple of {f}")
    grid = (config.data.resolution // f,) * 2
    n, lt = grid[0] * grid[1], config.data.t5_max_length

    def condition(rows, mesh, rules):
      put = functools.partial(shd.abstract_rows, mesh=mesh, rules=rules)
      return KontextCondition(reference=put((rows, n, cfg.in_channels), compute),
                              text=put((rows, lt, cfg.joint_attention_dim), compute),
                              pooled=put((rows, cfg.pooled_projection_dim), compute), guidance=put((rows,), "float32"),
                              img_ids=put((2 * n, 3), "float32", axes=(None,)),
                              txt_ids=put((lt, 3), "float32", axes=(None,)))

    return (lambda: flux.FluxTransformer(cfg, rngs=nnx.Rngs(0))), condition, grid, cfg.in_channels

  @staticmethod
  def abstract_encoders(config) -> dict:
    """The networks that stay on the chips beside the transformer (VAE, CLIP, T5) as constructors, for planning:
    the tiny preset's sizes (float32) or FLUX.1-Kontext-dev's in `config.model.dtype`, as `from_folder` loads them."""
    if config.model.preset == "tiny":
      from editr1_jax import tiny
      impl = config.model.attention_impl
      vae, (clip_cfg, t5_cfg) = autoencoder.tiny(attention_impl=impl), tiny.tiny_text_configs(attention_impl=impl)
    else:
      stored = dict(dtype=config.model.dtype, param_dtype=config.model.dtype,
                    attention_impl=config.model.attention_impl)
      vae, clip_cfg, t5_cfg = autoencoder.flux(**stored), clip.clip_l(**stored), t5.t5_xxl(**stored)
    return {"VAE": lambda: autoencoder.Autoencoder(vae, rngs=nnx.Rngs(0)),
            "CLIP": lambda: clip.CLIPTextModel(clip_cfg, rngs=nnx.Rngs(0)),
            "T5": lambda: t5.T5EncoderModel(t5_cfg, rngs=nnx.Rngs(0))}

  @staticmethod
  def abstract_text_step(config, modules: dict, rows: int, mesh, rules):
    """(jitted prompt encoding, its abstract arguments) for planning: `rows` instructions through CLIP (its full
    length) and T5 (`config.data.t5_max_length`); `modules`: `abstract_encoders`' (graphdef, state) by name."""
    (clip_def, clip_state), (t5_def, t5_state) = modules["CLIP"], modules["T5"]
    clip_length = nnx.merge(clip_def, clip_state).cfg.max_position_embeddings
    step = jax.jit(lambda c, t, clip_ids, t5_ids: encode_prompts(nnx.merge(clip_def, c), nnx.merge(t5_def, t), clip_ids,
                                                                 t5_ids, mesh=mesh, rules=rules))
    ids = lambda n: shd.abstract_rows((rows, n), "int32", mesh, rules)
    return step, (clip_state, t5_state, ids(clip_length), ids(config.data.t5_max_length))

  # the family interface ---------------------------------------------------------------------------
  @staticmethod
  def condition_axes(cond=None) -> KontextCondition:
    return KontextCondition.logical_axes()

  def grid(self, height: int, width: int) -> tuple[int, int]:
    f = self.multiple_of
    if height % f or width % f:
      raise ValueError(f"an image of {height}x{width} pixels: sides must be multiples of {f}")
    return height // f, width // f

  def condition(self, sources: np.ndarray, instructions: Sequence[str], *, grid: tuple[int, int],
                guidance: float) -> KontextCondition:
    """Sources (n, H, W, 3) in [-1, 1], one instruction each, the target's token grid -> host condition rows;
    each distinct instruction is encoded once (cached), the sources in fixed-size chunks."""
    if isinstance(sources, (list, tuple)):
      raise ValueError(f"FLUX.1-Kontext edits one source image per instruction, got {len(sources)} per row")
    if len(instructions) != len(sources):
      raise ValueError(f"{len(sources)} source images but {len(instructions)} instructions")
    ref_grid = self.grid(sources.shape[1], sources.shape[2])
    n = len(sources)
    chunk = self.chunk or n
    reference = chunks.map_chunks(lambda idx: self._encode(self.vae, shd.put_rows(sources[idx], self.mesh,
                                                                                 self.rules)), n, chunk)
    text, pooled = self.prompts(list(instructions), list(instructions), chunk)
    img_ids = np.concatenate([latents.target_ids(*grid), latents.reference_ids(*ref_grid)])
    return KontextCondition(reference=reference, text=text, pooled=pooled,
                            guidance=np.full(n, guidance, np.float32), img_ids=img_ids,
                            txt_ids=np.zeros((text.shape[1], 3), np.float32))

  def sigmas(self, num_steps: int, grid: tuple[int, int]) -> np.ndarray:
    return sampling.shifted_sigmas(num_steps, grid[0] * grid[1], self.shift)

  def noise_shape(self, grid: tuple[int, int]) -> tuple[int, int]:
    return grid[0] * grid[1], self.transformer.cfg.in_channels

  def decode(self, tokens: jax.Array, grid: tuple[int, int]) -> np.ndarray:
    return shd.to_host(self._decode(self.vae, tokens, height=2 * grid[0], width=2 * grid[1]))

  @staticmethod
  def training_image(source, resolution: int) -> np.ndarray:
    return latents.training_image(source, resolution, resolution)

  @staticmethod
  def inference_image(source, auto_resize: bool = True) -> np.ndarray:
    return latents.inference_image(source, auto_resize)

  @property
  def cache_misses(self) -> int:
    """Instructions encoded so far (a cache miss each)."""
    return self.prompts.misses
