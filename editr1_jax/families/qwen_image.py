"""Qwen-Image-Edit (2509, 2511) as a model family: the Qwen-Image transformer over [text | target | condition images],
the Qwen-Image VAE (per-channel normalised 16-channel latents packed 2x2), Qwen2.5-VL-7B hidden states of the
pipeline's template around the instruction and the condition images as text conditioning, the folder's schedule
(dynamic shift with a terminal stretch).

Equal to diffusers' `QwenImageEditPlusPipeline` (see `qwen_image_conditioning` for the prompt), with these
choices: every row's condition images have the same sizes (they are batched); the VL encoder sees each condition
image resized from the image given here (the pipeline resizes the caller's original: the same when the input is
already at the VAE size, which `inference_image` makes it); a row's text is padded to a fixed length with a mask
(the transformer's output does not depend on the padding). True CFG (a negative prompt, rescaled to the
conditional prediction's norm) is used when `guidance` > 1, as the pipeline's `true_cfg_scale`; training uses none.
"""

import functools
import os
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editr1_jax import chunks, latents, metrics, paths, sampling
from editr1_jax import qwen_image_conditioning as qic
from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.families.base import family_from_config, lora_spec, policy_from_config, register, \
  scheduler_shift
from editr1_jax.families.base import runtime as family_runtime
from editr1_jax.layers import AdapterRows, LoraSpec
from editr1_jax.models import qwen2_5_vl, qwen_image, qwen_image_vae
from editr1_jax.reward import processor as proc

NEGATIVE_PROMPT = " "  # the negative prompt of the model card's examples (benchmark sampling with true CFG)
# Qwen-Image's scheduler_config.json: exponential dynamic shift over 256..8192 tokens, ending at sigma 0.02.
QWEN_SHIFT = sampling.ShiftConfig(base_len=256, max_len=8192, base_shift=0.5, max_shift=0.9, shift_terminal=0.02)


@flax.struct.dataclass
class Prompt:
  """Prompt embeddings padded to a fixed length and which of their tokens are real."""

  embeds: jax.Array  # (B, Lt, D)
  mask: jax.Array  # (B, Lt) int32, 1 for real tokens

  @staticmethod
  def logical_axes() -> "Prompt":
    return Prompt(("batch", "seq", None), ("batch", None))


@flax.struct.dataclass
class QwenImageCondition:
  """Everything the Qwen-Image transformer sees besides the noisy target latent, batched over rows."""

  reference: jax.Array  # (B, Lr, C) packed normalised latents of the condition images, one after the other
  prompt: Prompt
  negative: Prompt | None  # true CFG's negative prompt (with the same images); None: no CFG
  cfg_scale: jax.Array  # (B,) true CFG scale (used only with `negative`)
  image_positions: jax.Array  # (L + Lr, 3) rotary positions (frame, row, col): target, then each image
  text_positions: jax.Array  # (Lt, 3)

  @staticmethod
  def logical_axes(negative: bool = False) -> "QwenImageCondition":
    prompt = Prompt.logical_axes()
    return QwenImageCondition(("batch", "seq", None), prompt, prompt if negative else None,
                              ("batch",), (None, None), (None, None))


def velocity(model, z: jax.Array, sigma: jax.Array, cond: QwenImageCondition,
             adapters: AdapterRows | None = None) -> jax.Array:
  """The transformer as a velocity field on the target tokens (condition-image tokens appended, output cut back);
  with a negative prompt, both predictions in one batched call combined by true CFG."""
  b, n = z.shape[:2]
  sigma = jnp.broadcast_to(sigma, (b,))
  hidden = jnp.concatenate([z, cond.reference.astype(z.dtype)], axis=1)
  positions = (cond.image_positions, cond.text_positions)

  def run(prompt: Prompt, hidden, sigma, adapters):
    return model(hidden_states=hidden, encoder_hidden_states=prompt.embeds, encoder_hidden_states_mask=prompt.mask,
                 timestep=sigma, positions=positions, target_tokens=n, adapters=adapters)[:, :n]

  if cond.negative is None:
    return run(cond.prompt, hidden, sigma, adapters)
  if adapters is not None:
    raise ValueError("true CFG (a negative prompt) is for sampling; the training step uses no CFG")
  both = jax.tree.map(lambda p, q: jnp.concatenate([p, q]), cond.prompt, cond.negative)
  v = run(both, jnp.concatenate([hidden, hidden]), jnp.concatenate([sigma, sigma]), None)
  return sampling.true_cfg(v[:b], v[b:], cond.cfg_scale)


def _image_rows(sources) -> list[np.ndarray]:
  """`sources` as the list of its condition images, each (n, H, W, 3): one array is one image per row."""
  if isinstance(sources, np.ndarray) or hasattr(sources, "shape"):
    sources = [sources]
  sources = [np.asarray(s, np.float32) for s in sources]
  if not 1 <= len(sources) <= qic.MAX_IMAGES:
    raise ValueError(f"{len(sources)} condition images per row; Qwen-Image-Edit takes 1 to {qic.MAX_IMAGES}")
  if any(s.ndim != 4 or s.shape[-1] != 3 or len(s) != len(sources[0]) for s in sources):
    raise ValueError(f"condition images must be (n, H, W, 3) arrays with the same n, got "
                     f"{[tuple(s.shape) for s in sources]}")
  return sources


# The releases of the line by their transformer's zero_cond_t (diffusers loads both with QwenImageEditPlusPipeline).
RELEASES = {"2509": False, "2511": True}


def folder_release(config) -> str | None:
  """The release of `config.model.pipeline_dir` from its transformer's config.json; None without one, with a
  folder that cannot be read (the config check names the field then) or with the tiny preset (it reads no folder)."""
  folder = paths.join(config.model.pipeline_dir, "transformer")
  try:
    if config.model.preset or not config.model.pipeline_dir or not paths.isfile(paths.join(folder, "config.json")):
      return None
  except paths.PathError:
    return None
  return "2511" if wio.read_config(folder).get("zero_cond_t", False) else "2509"


def zero_cond_t(config) -> bool:
  """Whether the run's transformer is 2511's: the folder's release where there is one, else
  `config.model.release` (2509 by default). A named release the folder contradicts is an error."""
  named, found = config.model.release, folder_release(config)
  if named not in ("",) + tuple(RELEASES):
    raise ValueError(f"config.model.release = {named!r}: expected '' or one of {list(RELEASES)}")
  if named and found is not None and found != named:
    raise ValueError(f"config.model.release = {named!r}, but config.model.pipeline_dir holds Qwen-Image-Edit-{found} "
                     "(its transformer/config.json's zero_cond_t)")
  return RELEASES[found or named or "2509"]


@register("qwen_image_edit")
class QwenImageEdit:
  """A Qwen-Image-Edit pipeline's transformer, VAE and Qwen2.5-VL encoder, and what the method needs. The release
  is the folder's (2511: its transformer's zero_cond_t); both load with diffusers' QwenImageEditPlusPipeline."""

  name = "qwen_image_edit"
  pipeline_classes = ("QwenImageEditPlusPipeline", "QwenImageEditPipeline")  # model_index.json `_class_name`s
  releases = tuple(RELEASES)  # config.model.release
  check_lora_targets = staticmethod(qwen_image.check_lora_targets)
  velocity = staticmethod(velocity)
  weight_table, lora_weight_table = qwen_image.QWEN_IMAGE_WEIGHTS, qwen_image.QWEN_IMAGE_LORA_WEIGHTS
  lora_prefixes = qwen_image.LORA_PREFIXES
  # The model cards' sampling, 2509's and 2511's alike: 40 Euler steps, true CFG 4 with the negative prompt " ".
  benchmark_sampling = {"steps": 40, "guidance": 4.0, "sampler": "euler"}

  def __init__(self, transformer: qwen_image.QwenImageTransformer, vae: qwen_image_vae.QwenImageVAE,
               text: qic.QwenImageTextEncoder, shift: sampling.ShiftConfig = QWEN_SHIFT, *, mesh=None,
               rules=shd.DEFAULT_RULES, chunk: int | None = None, prompt_cache_entries: int = 4096,
               negative_prompt: str = NEGATIVE_PROMPT):
    """`chunk`: rows per encoding call (default: all rows of a call at once)."""
    if transformer.cfg.in_channels != 4 * vae.cfg.z_dim:
      raise ValueError(f"transformer in_channels {transformer.cfg.in_channels} must be 4 x the VAE's "
                       f"{vae.cfg.z_dim} latent channels (2x2 packed tokens)")
    if transformer.cfg.joint_attention_dim != text.cfg.hidden_size:
      raise ValueError(f"transformer joint_attention_dim {transformer.cfg.joint_attention_dim} must be the text "
                       f"encoder's hidden size {text.cfg.hidden_size}")
    if text.max_sequence_length is None:
      raise ValueError("the text encoder needs a fixed max_sequence_length (rows of one length)")
    self.transformer, self.vae, self.text, self.shift = transformer, vae, text, shift
    self.mesh, self.rules, self.chunk = mesh, tuple(rules), chunk
    self.negative_prompt = negative_prompt
    self.prompts = qic.ConditionCache(text, prompt_cache_entries)
    self.multiple_of = 2 * vae.cfg.downsample_factor  # a VAE pixel block times the 2x2 packing
    self._encode = jax.jit(lambda vae, images: latents.reference_latents(vae, images)[0])
    self._decode = jax.jit(latents.decode_tokens, static_argnames=("height", "width"))

  # building ---------------------------------------------------------------------------------------
  @classmethod
  def from_folder(cls, folder: str, *, dtype: str = "float32", param_dtype: str | None = None,
                  lora: LoraSpec | None = None, lora_weights: str | None = None, remat: str = "none",
                  attention_impl: str = "auto", scan_blocks: bool = True,
                  max_sequence_length: int = qic.MAX_SEQUENCE_LENGTH, mesh=None, rules=shd.DEFAULT_RULES,
                  seed: int = 0, **kw) -> "QwenImageEdit":
    """A diffusers Qwen-Image-Edit(-2509) folder (transformer/, vae/, text_encoder/, processor/, tokenizer/,
    scheduler/)."""
    shift = scheduler_shift(folder)  # the cheap checks first
    text = qic.QwenImageTextEncoder.from_pipeline(folder, dtype=dtype, max_sequence_length=max_sequence_length,
                                                  mesh=mesh, rules=rules, attention_impl=attention_impl)
    transformer = qwen_image.load_qwen_image_transformer(folder, dtype=dtype, param_dtype=param_dtype, lora=lora,
                                                         lora_weights=lora_weights, remat=remat,
                                                         attention_impl=attention_impl, scan_blocks=scan_blocks,
                                                         mesh=mesh, rules=rules, seed=seed)
    vae = qwen_image_vae.load_qwen_image_vae(folder, dtype=dtype, mesh=mesh, rules=rules, attention_impl=attention_impl)
    return cls(transformer, vae, text, shift, mesh=mesh, rules=rules, **kw)

  @classmethod
  def tiny(cls, seed: int = 0, *, lora: LoraSpec | None = None, max_sequence_length: int = 64, mesh=None,
           rules=shd.DEFAULT_RULES, dtype: str = "float32", param_dtype: str | None = None, remat: str = "none",
           attention_impl: str = "auto", scan_blocks: bool = True, zero_cond_t: bool = False,
           **kw) -> "QwenImageEdit":
    """Small random models drawn from `seed`, sized to the shipped tiny Qwen tokenizer; Qwen-Image's schedule.
    `zero_cond_t`: the 2511 release's transformer."""
    from editr1_jax import tiny
    transformer = tiny.tiny_qwen_image_transformer(seed, lora, mesh=mesh, rules=rules, dtype=dtype,
                                                   param_dtype=param_dtype, remat=remat, attention_impl=attention_impl,
                                                   scan_blocks=scan_blocks, zero_cond_t=zero_cond_t)
    return cls(transformer, tiny.tiny_qwen_image_vae(seed, mesh=mesh, rules=rules, attention_impl=attention_impl),
               tiny.tiny_qwen_text_encoder(seed, max_sequence_length, mesh=mesh, rules=rules,
                                           attention_impl=attention_impl), mesh=mesh, rules=rules, **kw)

  @classmethod
  def from_config(cls, config, mesh=None, rules=None) -> "QwenImageEdit":
    """`config.model.preset` "tiny" (built in code, of `config.model.release`) or "" (read from
    `config.model.pipeline_dir`: the folder's release)."""
    return family_from_config(cls, config, mesh, rules, max_sequence_length=config.data.text_max_length,
                              zero_cond_t=zero_cond_t(config))

  @staticmethod
  def transformer_from_config(config, mesh=None, rules=shd.DEFAULT_RULES):
    """The policy network alone (what an export needs), with the config's LoRA unless fully fine-tuned."""
    from editr1_jax import tiny
    tiny_builder = functools.partial(tiny.tiny_qwen_image_transformer, zero_cond_t=zero_cond_t(config))
    return policy_from_config(config, mesh, rules, tiny_builder, qwen_image.load_qwen_image_transformer)

  @classmethod
  def abstract_parts(cls, config, layers: tuple[int, ...] | None = None):
    """What ahead-of-time planning needs from the config alone, nothing allocated: (a transformer constructor,
    `condition(rows, mesh, rules)` -> abstract condition rows, the token grid, the token channels); the tiny preset's
    sizes or Qwen-Image-Edit-2509's; `layers` (blocks,) overrides the depth. One condition image per row at the
    training resolution, the text at `config.data.text_max_length`."""
    runtime = dict(family_runtime(config), lora=lora_spec(config))
    runtime["zero_cond_t"] = zero_cond_t(config)
    if config.model.preset == "tiny":
      from editr1_jax import tiny
      cfg, vae, compute = tiny.tiny_qwen_image_config(**runtime), qwen_image_vae.tiny(), "float32"
    else:  # 2509's sizes, which are 2511's too (zero_cond_t is in `runtime`)
      cfg, vae, compute = qwen_image.edit_2509(**runtime), qwen_image_vae.qwen_image(), config.model.dtype
    if layers is not None:
      cfg = cfg.replace(num_layers=layers[0])
    f = 2 * vae.downsample_factor
    if config.data.resolution % f:
      raise ValueError(f"config.data.resolution = {config.data.resolution}: must be a multiple of {f}")
    grid = (config.data.resolution // f,) * 2
    n, lt = grid[0] * grid[1], config.data.text_max_length

    def condition(rows, mesh, rules):
      put = functools.partial(shd.abstract_rows, mesh=mesh, rules=rules)
      prompt = Prompt(put((rows, lt, cfg.joint_attention_dim), compute), put((rows, lt), "int32"))  # as encoded
      return QwenImageCondition(reference=put((rows, n, cfg.in_channels), compute), prompt=prompt, negative=None,
                                cfg_scale=put((rows,), "float32"),
                                image_positions=put((2 * n, 3), "float32", axes=(None,)),
                                text_positions=put((lt, 3), "float32", axes=(None,)))

    return (lambda: qwen_image.QwenImageTransformer(cfg, rngs=nnx.Rngs(0))), condition, grid, cfg.in_channels

  @staticmethod
  def abstract_encoders(config) -> dict:
    """The networks that stay on the chips beside the transformer (VAE, the Qwen2.5-VL prompt encoder) as
    constructors, for planning: the tiny preset's sizes (float32) or Qwen-Image-Edit-2509's (Qwen2.5-VL-7B) in
    `config.model.dtype`, as `from_folder` loads them."""
    if config.model.preset == "tiny":
      from editr1_jax import tiny
      impl = config.model.attention_impl
      vae, text = qwen_image_vae.tiny(attention_impl=impl), tiny.tiny_judge_config(attention_impl=impl)
    else:
      stored = dict(dtype=config.model.dtype, param_dtype=config.model.dtype,
                    attention_impl=config.model.attention_impl)
      vae, text = qwen_image_vae.qwen_image(**stored), qwen2_5_vl.qwen2_5_vl_7b(**stored)
    return {"VAE": lambda: qwen_image_vae.QwenImageVAE(vae, rngs=nnx.Rngs(0)),
            "Qwen2.5-VL": lambda: qwen2_5_vl.Qwen25VL(text, rngs=nnx.Rngs(0))}

  @staticmethod
  def abstract_text_step(config, modules: dict, rows: int, mesh, rules):
    """(jitted prompt encoding, its abstract arguments) for planning: `rows` prompts of the dropped system turn plus
    `config.data.text_max_length` tokens, each with one condition image at the training resolution as Qwen2.5-VL
    sees it (~384 x 384; the processor's default pixel bounds); `modules`: `abstract_encoders`' (graphdef, state)."""
    graphdef, state = modules["Qwen2.5-VL"]
    cfg = nnx.merge(graphdef, state).cfg
    if config.model.preset == "tiny":
      from editr1_jax import tiny
      image_cfg = proc.ImageProcessorConfig.from_folder(os.path.join(tiny.ASSETS, "judge"))
    else:
      image_cfg = proc.ImageProcessorConfig(*proc.DEFAULT_PIXELS)
    size = image_cfg.resized(*qic.vl_image_size(config.data.resolution, config.data.resolution))
    length = qic.TEMPLATE_DROP + config.data.text_max_length
    batch = qwen2_5_vl.abstract_batch(cfg, image_cfg, rows, size, 1, qic.TEMPLATE_DROP + 16, length, mesh, rules,
                                      left_pad=False)
    step = jax.jit(functools.partial(qic.encode_step, graphdef, qic.TEMPLATE_DROP, mesh, rules))
    return step, (state, batch, shd.abstract_rows((rows, config.data.text_max_length), "int32", mesh, rules))

  # the family interface ---------------------------------------------------------------------------
  @staticmethod
  def check_config(config) -> None:
    """The NFT loss trains the conditional velocity, so training rollouts sample without true CFG; a named
    `config.model.release` must be the pipeline folder's."""
    if config.rollout.guidance != 1:
      raise ValueError(f"config.rollout.guidance = {config.rollout.guidance}: Qwen-Image-Edit's guidance is true CFG, "
                       f"which training rollouts do not use (set 1.0; rollout.eval_guidance may use CFG)")
    zero_cond_t(config)

  @staticmethod
  def condition_axes(cond: QwenImageCondition | None = None) -> QwenImageCondition:
    return QwenImageCondition.logical_axes(negative=cond is not None and cond.negative is not None)

  def grid(self, height: int, width: int) -> tuple[int, int]:
    f = self.multiple_of
    if height % f or width % f:
      raise ValueError(f"an image of {height}x{width} pixels: sides must be multiples of {f}")
    return height // f, width // f

  def condition(self, sources, instructions: Sequence[str], *, grid: tuple[int, int],
                guidance: float) -> QwenImageCondition:
    """Condition images ((n, H, W, 3) in [-1, 1], or a list of 1-3 such batches: several images per row) and one
    instruction per row, the target's token grid -> host condition rows. Each distinct (instruction, images) is
    encoded once (cached); the images' latents in fixed-size chunks. `guidance` > 1: true CFG at that scale."""
    images = _image_rows(sources)
    n = len(images[0])
    if len(instructions) != n:
      raise ValueError(f"{n} source images but {len(instructions)} instructions")
    chunk = self.chunk or n
    grids = [self.grid(im.shape[1], im.shape[2]) for im in images]
    reference = np.concatenate([
        chunks.map_chunks(lambda idx, im=im: self._encode(self.vae, shd.put_rows(im[idx], self.mesh, self.rules)), n,
                          chunk) for im in images], axis=1)
    as_uint8 = [metrics.to_uint8(im) for im in images]  # what the VL encoder's processor reads
    pixels = [[im[i] for im in as_uint8] for i in range(n)]
    embeds, mask = self.prompts(list(instructions), pixels, chunk)
    negative = None
    if guidance > 1:
      neg_embeds, neg_mask = self.prompts([self.negative_prompt] * n, pixels, chunk)
      negative = Prompt(neg_embeds, neg_mask)
    image_positions, text_positions = qwen_image.rope_positions([[(1, *grid)] + [(1, *g) for g in grids]],
                                                                embeds.shape[1])
    return QwenImageCondition(reference=reference, prompt=Prompt(embeds, mask), negative=negative,
                              cfg_scale=np.full(n, guidance, np.float32), image_positions=image_positions,
                              text_positions=text_positions)

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
    """The pipeline's VAE input: about 1024 x 1024 pixels at the image's aspect ratio (sides multiples of 32)."""
    if auto_resize:
      return qic.vae_image(latents.load_image(source))
    return latents.to_array(latents.load_image(source))

  @property
  def cache_misses(self) -> int:
    """(instruction, images) pairs encoded so far (a cache miss each)."""
    return self.prompts.misses
