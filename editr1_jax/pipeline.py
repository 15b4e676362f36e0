"""Editing with a model family: source images + instructions -> edited images, through the same
rollout path as training (`rollouts.generate`).

For FLUX.1-Kontext this equals diffusers' `FluxKontextPipeline` without true CFG (true_cfg_scale 1).
One deliberate difference: by default the output takes the (Kontext-resized) input's size; diffusers
makes it 1024x1024 whatever the input's aspect ratio. Rows are split over the mesh's data x fsdp axes
where they divide.
"""

import json
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from editr1_jax import families, latents, rollouts, sampling, streams
from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.layers import LoraSpec


def lora_spec_of_file(path: str, alpha: float | None = None, family: str = "kontext") -> LoraSpec:
  """Rank, alpha and target modules of a diffusers / peft LoRA file for a `family`'s transformer.

  Rank and alpha come from its `lora_adapter_metadata` (diffusers' `save_lora_weights` and our export
  write it); a file without one gives its rank through the tensor shapes and needs `alpha`.
  """
  family = families.family_class(family)
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
    for prefix in family.lora_prefixes:
      module = module.removeprefix(prefix)
    modules.add(module)
  config = json.loads(reader.metadata.get("lora_adapter_metadata", "{}"))
  if config.get("transformer.r", rank) != rank:
    raise wio.CheckpointError(f"{path}: metadata says rank {config['transformer.r']}, tensors have rank {rank}")
  alpha = config.get("transformer.lora_alpha", alpha)
  if alpha is None:
    raise ValueError(f"{path}: no lora_alpha in the file's metadata: give the alpha the adapter was trained with")
  family.check_lora_targets(tuple(sorted(modules)), f"{path}: adapter")
  return LoraSpec(rank=rank, alpha=float(alpha), targets=tuple(sorted(modules)))


class Editor:
  """A loaded family, sampling its transformer as it is (with a LoRA file's adapter at full scale, if any)."""

  def __init__(self, family):
    self.family = family
    self._graphdef, self._state = nnx.split(family.transformer)
    self._sampler = self._make_sampler(None)  # one jit for every call without a progress hook

  def _make_sampler(self, progress) -> rollouts.Sampler:
    return rollouts.Sampler(self.family, lambda state: nnx.merge(self._graphdef, state), progress=progress)

  @classmethod
  def from_folder(cls, folder: str, *, family: str = "kontext", dtype: str = "float32", lora_weights: str | None = None,
                  lora_alpha: float | None = None, mesh=None, rules=shd.DEFAULT_RULES, **kw) -> "Editor":
    """A diffusers pipeline folder of `family`, with an optional LoRA file applied to the transformer."""
    lora = None if lora_weights is None else lora_spec_of_file(lora_weights, lora_alpha, family)
    return cls(families.family_class(family).from_folder(folder, dtype=dtype, lora=lora, lora_weights=lora_weights,
                                                         mesh=mesh, rules=rules, **kw))

  def __call__(self, sources, instructions: Sequence[str], *, height: int | None = None, width: int | None = None,
               num_steps: int = 28, guidance: float = 3.5, seed: int = 0, solver: str = "euler",
               auto_resize: bool = True, max_area: int | None = None, noise: np.ndarray | None = None,
               keys: np.ndarray | None = None,
               progress: Callable[[jax.Array], None] | None = None) -> tuple[np.ndarray, sampling.Rollout]:
    """Edit each source (path, PIL image or uint8 array; or a list of them: several condition images, for families
    that take them) by its instruction -> (images in [-1, 1], rollout).

    Sources are resized as the family's pipeline does (`inference_image`) and must then share one size per position.
    The output is height x width (default: the resized sources' size), rescaled to `max_area` pixels at that
    aspect ratio if given (diffusers always rescales, to 1024 ** 2 by default). Row b samples from the key
    fold_in(key(seed, "edit", 0), b) (`streams`), or from `keys[b]` (host key data) if given, unless `noise` is.
    """
    family = self.family
    rows = [list(s) if isinstance(s, (list, tuple)) else [s] for s in sources]
    if len({len(r) for r in rows}) != 1:
      raise ValueError(f"every instruction needs the same number of source images, got {[len(r) for r in rows]}")
    batches = []  # one (n, H, W, 3) batch per image position
    for k in range(len(rows[0])):
      images = [family.inference_image(r[k], auto_resize) for r in rows]
      if len({im.shape for im in images}) != 1:
        raise ValueError(f"the sources resize to different sizes {sorted({im.shape[:2] for im in images})}; "
                         f"edit them in separate calls")
      batches.append(np.stack(images))
    sources = batches[0] if len(batches) == 1 else batches
    height, width = height or batches[-1].shape[1], width or batches[-1].shape[2]  # the last image's, as diffusers
    if max_area is not None:
      height, width = latents.area_resolution(height, width, max_area)
    grid = family.grid(height, width)
    cond = family.condition(sources, list(instructions), grid=grid, guidance=guidance)
    sampler = self._sampler if progress is None else self._make_sampler(progress)
    keys = streams.row_keys(seed, "edit", 0, len(rows)) if keys is None else np.asarray(keys)
    x0, edited, sigmas = rollouts.generate(sampler, self._state, cond, keys,
                                           grid=grid, num_steps=num_steps, solver=solver, chunk=len(rows),
                                           noise=noise)
    return edited, sampling.Rollout(x0, sigmas)
