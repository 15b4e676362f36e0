"""The seam between the method and a base model: what differs between editors (FLUX.1-Kontext,
Qwen-Image-Edit, ...) lives behind `Family`; everything else (rollouts, reward, advantages, NFT,
checkpoints, export) is written once against it.

A condition is a flax struct of arrays whose `logical_axes()` names each field's axes; fields whose
first axis is "batch" are per-row, the others (position ids) are shared by every row. The row
helpers of `sharding` (`host_rows`, `tile_rows`, `put_tree`) use that, so the NFT step can gather,
tile and shard any family's condition.
"""

from typing import Callable, ClassVar, Protocol, Sequence

import jax
import numpy as np
from flax import nnx

from editr1_jax import paths, sampling
from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.layers import AdapterRows, LoraSpec


class Family(Protocol):
  """A loaded base model. Host arrays in, host arrays out, except `velocity` (pure, jit-traced)."""

  name: ClassVar[str]
  pipeline_classes: ClassVar[tuple]  # the diffusers pipelines whose folders it reads (model_index.json `_class_name`)
  benchmark_sampling: ClassVar[dict]  # steps, guidance, sampler the benchmark reproductions use (launch/evaluate.py)
  weight_table: ClassVar[tuple]  # the transformer's diffusers tensor names (export)
  lora_weight_table: ClassVar[tuple]  # its adapters' diffusers / peft names (export, LoRA files)
  lora_prefixes: ClassVar[tuple]  # prefixes of a LoRA file's tensor names
  transformer: nnx.Module  # the policy network (with its LoRA adapters when trained with LoRA)
  mesh: object  # the mesh the networks are placed on (None: one device)
  rules: tuple  # logical axis rules
  chunk: int | None  # rows per encoding call
  cache_misses: int  # condition encodings computed so far (a metric)

  @classmethod
  def from_config(cls, config, mesh=None, rules=None) -> "Family":
    """`config.model.preset` ("tiny": built in code) or the folder `config.model.pipeline_dir`."""

  @classmethod
  def from_folder(cls, folder: str, **kw) -> "Family":
    """A pipeline folder (what `launch/edit.py` and `launch/evaluate.py` load)."""

  @staticmethod
  def transformer_from_config(config, mesh=None, rules=None) -> nnx.Module:
    """The policy network alone (export)."""

  @classmethod
  def abstract_parts(cls, config, layers=None):
    """(transformer constructor, condition(rows, mesh, rules) -> abstract rows, token grid, latent channels) from
    the config alone: what `launch/plan.py` compiles against."""

  @staticmethod
  def abstract_encoders(config) -> dict:
    """{name: constructor} of the networks besides the transformer that stay on the chips through the epoch: the
    VAE (key "VAE") and the text encoders; counted as resident by `launch/plan.py`."""

  @staticmethod
  def abstract_text_step(config, modules: dict, rows: int, mesh, rules):
    """(jitted prompt encoding, its abstract arguments) on `rows` prompts, for `launch/plan.py`; `modules`:
    `abstract_encoders`' networks as abstract (graphdef, state) by name. A `ValueError` says why it cannot be made."""

  @staticmethod
  def check_config(config) -> None:
    """A ValueError naming `config.<field>` for a setting this family cannot train with (run_config.validate)."""

  @staticmethod
  def check_lora_targets(targets, where: str) -> None:
    """An error naming `where` and every target that matches no layer."""

  @staticmethod
  def velocity(model, z: jax.Array, sigma: jax.Array, cond, adapters: AdapterRows | None = None) -> jax.Array:
    """v at the noisy target tokens z (B, L, C) and flow time sigma ((B,) in [0, 1])."""

  def condition_axes(self, cond=None):
    """The logical axes of this family's condition (a condition-shaped pytree of tuples): of `cond` when given
    (a condition may hold optional parts, e.g. a negative prompt for true CFG), else of a training condition."""

  def grid(self, height: int, width: int) -> tuple[int, int]:
    """The target's token grid for an image of height x width pixels."""

  def condition(self, sources: np.ndarray, instructions: Sequence[str], *, grid: tuple[int, int], guidance: float):
    """Source images (n, H, W, 3) in [-1, 1] and instructions -> the condition of n rows (host arrays)."""

  def sigmas(self, num_steps: int, grid: tuple[int, int]) -> np.ndarray:
    """The (num_steps + 1,) sampling schedule, ending in 0, of the folder's scheduler."""

  def noise_shape(self, grid: tuple[int, int]) -> tuple[int, ...]:
    """One row's latent (and initial noise) shape."""

  def decode(self, tokens: jax.Array, grid: tuple[int, int]) -> np.ndarray:
    """Latent tokens (n, L, C) -> images (n, H, W, 3) in ~[-1, 1] (host)."""

  def training_image(self, source, resolution: int) -> np.ndarray:
    """A dataset image -> the training input (resolution x resolution, [-1, 1])."""

  def inference_image(self, source, auto_resize: bool = True) -> np.ndarray:
    """An image to edit -> the pipeline's input ([-1, 1]), resized as the family's pipeline does."""


FAMILIES: dict[str, Callable] = {}


def register(name: str):
  """Class decorator: `config.model.family = name` builds it with `cls.from_config(config, mesh, rules)`."""
  def add(cls):
    if FAMILIES.get(name, cls) is not cls:
      raise ValueError(f"model family {name!r} is already registered ({FAMILIES[name].__name__})")
    FAMILIES[name] = cls
    return cls
  return add


def family_class(name: str):
  if name not in FAMILIES:
    raise ValueError(f"config.model.family = {name!r} is not a registered family; registered: {sorted(FAMILIES)}")
  return FAMILIES[name]


def family_of_folder(folder: str) -> str:
  """The registered family that reads a diffusers pipeline folder, from its model_index.json `_class_name`."""
  index = wio.read_config(folder, "model_index.json")
  name = index.get("_class_name")
  found = [f for f, cls in FAMILIES.items() if name in cls.pipeline_classes]
  if not found:
    known = sorted(c for cls in FAMILIES.values() for c in cls.pipeline_classes)
    raise ValueError(f"{paths.join(folder, 'model_index.json')}: _class_name {name!r} is not a pipeline of a "
                     f"registered family ({known})")
  return found[0]


def build(config, mesh=None, rules=None) -> Family:
  """The family named by `config.model.family`, loaded as `config.model` says (a preset or a folder)."""
  return family_class(config.model.family).from_config(config, mesh, rules)


def scheduler_shift(folder: str) -> sampling.ShiftConfig:
  """The sigma schedule a pipeline folder's scheduler/scheduler_config.json describes."""
  path = paths.join(folder, "scheduler", "scheduler_config.json")
  if not paths.isfile(path):
    raise FileNotFoundError(f"{path}: scheduler config not found")
  return sampling.ShiftConfig.from_diffusers_config(wio.read_config(paths.dirname(path), "scheduler_config.json"),
                                                    source=path)


def lora_spec(config) -> LoraSpec | None:
  """The config's adapter (`config.lora`), None for a full fine-tune."""
  if config.optim.full_finetune:
    return None
  return LoraSpec(rank=config.lora.rank, alpha=float(config.lora.alpha), targets=tuple(config.lora.targets))


def runtime(config) -> dict:
  """The networks' runtime settings in the config: compute and storage dtypes, remat policy, attention kernel,
  blocks run by a scan."""
  return dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat,
              attention_impl=config.model.attention_impl, scan_blocks=config.model.scan_blocks)


def family_from_config(cls, config, mesh, rules, *, max_sequence_length: int, **tiny_kw):
  """A family class's `from_config`: `config.model.preset` "tiny" (`cls.tiny`, built in code, with `tiny_kw`) or ""
  (`cls.from_folder` on `config.model.pipeline_dir`), with the config's LoRA, dtypes, encoding chunk and prompt
  cache."""
  rules = shd.DEFAULT_RULES if rules is None else rules
  kw = dict(lora=lora_spec(config), max_sequence_length=max_sequence_length, mesh=mesh, rules=rules,
            chunk=config.rollout.batch_size * shd.batch_width(mesh),
            prompt_cache_entries=config.data.prompt_cache_entries, **runtime(config))
  if config.model.preset == "tiny":
    return cls.tiny(config.seed, **kw, **tiny_kw)
  return cls.from_folder(config.model.pipeline_dir, lora_weights=config.model.init_lora or None, seed=config.seed,
                         **kw)


def policy_from_config(config, mesh, rules, tiny_builder, loader):
  """A family's `transformer_from_config`: the policy network alone (what an export needs), with the config's LoRA
  unless fully fine-tuned: `tiny_builder(seed, lora, ...)` for the tiny preset, else `loader(pipeline_dir, ...)`."""
  kw = dict(mesh=mesh, rules=rules, **runtime(config))
  if config.model.preset == "tiny":
    return tiny_builder(config.seed, lora_spec(config), **kw)
  return loader(config.model.pipeline_dir, lora=lora_spec(config), lora_weights=config.model.init_lora or None,
                seed=config.seed, **kw)

