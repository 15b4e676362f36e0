"""Edit an image with FLUX.1-Kontext or Qwen-Image-Edit(-2509), optionally with a trained LoRA:

  python launch/edit.py --model=DIR [--lora=FILE] --image=in.png [--image=ref2.png ...] --instruction="..." \
      --out=out.png [--steps=N --guidance=G --seed=0 --sampler=euler|dpm2|sde --dtype=bfloat16|float32 --noauto_resize]

--model is a diffusers pipeline folder; its model_index.json says which family reads it (FluxKontextPipeline:
kontext; QwenImageEditPlusPipeline: qwen_image_edit, which takes 1-3 --image). --lora is a LoRA safetensors file as
our export (or diffusers / peft) writes it. --steps and --guidance default to the family's pipeline defaults
(Kontext: 28 steps, guidance embedding 3.5; Qwen-Image-Edit: 40 steps, true CFG 4 with the negative prompt " ").
The output has the resized (last) input's size. Every path flag takes a local path or a gs:// URL.
"""

import io
import math
import os
import sys


from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "A FLUX.1-Kontext or Qwen-Image-Edit pipeline folder (diffusers layout).")
_LORA = flags.DEFINE_string("lora", None, "LoRA safetensors file to apply to the transformer.")
_LORA_ALPHA = flags.DEFINE_float("lora_alpha", None, "LoRA alpha, only for a file without rank/alpha metadata.")
_IMAGE = flags.DEFINE_multi_string("image", None, "Source image (repeat for several condition images).")
_INSTRUCTION = flags.DEFINE_string("instruction", None, "Edit instruction.")
_OUT = flags.DEFINE_string("out", None, "Output image path (PNG recommended).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the family's).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Kontext: guidance-embedding value; Qwen-Image-Edit: true CFG scale "
                               "(1: none). Default: the family's.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial noise.")
_SAMPLER = flags.DEFINE_enum("sampler", "euler", ["euler", "dpm2", "sde"], "Solver.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute and parameter dtype.")
_AUTO_RESIZE = flags.DEFINE_bool("auto_resize", True, "Resize the input as the family's pipeline does (Kontext: the "
                                 "closest training resolution; Qwen: ~1024x1024 area), else only floor its sides to "
                                 "multiples of 16.")
flags.mark_flags_as_required(["model", "image", "instruction", "out"])


def check_args(model: str, images: list[str], instruction: str, out: str, lora: str | None, steps: int | None,
               guidance: float | None):
  """Every argument checked before any model loads (a bad --out would lose the edit); -> (family name, the
  decoded sources, steps, guidance).

  Raises ValueError naming the flag.
  """
  from PIL import Image

  from editr1_jax import families, paths
  from editr1_jax import images as image_io

  if isinstance(images, str):
    images = [images]
  for flag, values in (("model", [model]), ("image", images), ("lora", [lora] if lora else []), ("out", [out])):
    for value in values:
      paths.check_bucket(value, f"--{flag}")  # an unsupported URL scheme, a bucket that is not there
  if not paths.isdir(model):
    raise ValueError(f"--model: {model} is not a folder")
  try:
    family = families.family_of_folder(model)
  except ValueError as e:
    raise ValueError(f"--model: {e}") from e
  allowed = 3 if family == "qwen_image_edit" else 1
  if not 1 <= len(images) <= allowed:
    raise ValueError(f"--image: {len(images)} given; the {family} family takes 1 to {allowed}")
  if lora is not None and not paths.isfile(lora):
    raise ValueError(f"--lora: {lora} not found")
  if not instruction.strip():
    raise ValueError("--instruction is empty")
  defaults = families.family_class(family).benchmark_sampling
  steps = defaults["steps"] if steps is None else steps
  guidance = defaults["guidance"] if guidance is None else guidance
  if steps < 1:
    raise ValueError(f"--steps must be >= 1, got {steps}")
  if not (math.isfinite(guidance) and guidance >= 0):
    raise ValueError(f"--guidance must be a finite number >= 0, got {guidance}")
  ext = paths.splitext(out)[1].lower()
  fmt = Image.registered_extensions().get(ext)
  if fmt is None or fmt not in Image.SAVE:
    raise ValueError(f"--out: {out} has no image extension PIL can write (e.g. .png)")
  try:
    Image.new("RGB", (16, 16)).save(io.BytesIO(), format=fmt)
  except (OSError, ValueError) as e:
    raise ValueError(f"--out: PIL cannot write an RGB image as {fmt}: {e}") from e
  if paths.isdir(out):
    raise ValueError(f"--out: {out} is a folder")
  if not paths.is_url(out):  # a bucket has no folders to create: its existence was checked above
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # the nearest existing folder must let us create the rest
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
      raise ValueError(f"--out: cannot write under {parent}")
  try:
    sources = [image_io.load_rgb(path) for path in images]
  except image_io.ImageError as e:
    raise ValueError(f"--image: {e}") from e
  return family, sources, steps, guidance


def edit(model: str, image, instruction: str, out: str, *, lora: str | None = None,
         lora_alpha: float | None = None, steps: int | None = None, guidance: float | None = None, seed: int = 0,
         sampler: str = "euler", dtype: str = "bfloat16", auto_resize: bool = True) -> str:
  """Check the arguments, load the pipeline, edit `image` (a path, or a list of 1-3 paths) by `instruction` with a
  progress bar, write `out`; returns `out`."""
  family, sources, steps, guidance = check_args(model, image, instruction, out, lora, steps, guidance)
  import jax
  from PIL import Image
  from tqdm import tqdm

  from editr1_jax import images as image_io
  from editr1_jax.metrics import to_uint8
  from editr1_jax.pipeline import Editor

  pipe = Editor.from_folder(model, family=family, dtype=dtype, lora_weights=lora, lora_alpha=lora_alpha)
  with tqdm(total=steps, desc="editing", unit="step") as bar:
    images, _ = pipe([sources if len(sources) > 1 else sources[0]], [instruction], num_steps=steps, guidance=guidance,
                     seed=seed, solver=sampler, auto_resize=auto_resize, progress=lambda sigma: bar.update(1))
    jax.effects_barrier()
  image_io.save(Image.fromarray(to_uint8(images[0])), out)
  return out


def main(argv):
  del argv
  try:
    path = edit(_MODEL.value, _IMAGE.value, _INSTRUCTION.value, _OUT.value, lora=_LORA.value,
                lora_alpha=_LORA_ALPHA.value, steps=_STEPS.value, guidance=_GUIDANCE.value, seed=_SEED.value,
                sampler=_SAMPLER.value, dtype=_DTYPE.value, auto_resize=_AUTO_RESIZE.value)
  except ValueError as e:  # a bad argument or model folder: the message names it
    sys.exit(f"error: {e}")
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
