"""Edit one image with FLUX.1-Kontext, optionally with a trained LoRA:

  python launch/edit.py --model=DIR [--lora=FILE] --image=in.png --instruction="..." --out=out.png \
      [--steps=28 --guidance=3.5 --seed=0 --sampler=euler|dpm2|sde --dtype=bfloat16|float32 --noauto_resize]

--model is a diffusers FLUX.1-Kontext pipeline folder; --lora a LoRA safetensors file as our export
(or diffusers / peft) writes it. The output has the Kontext-resized input's size.
"""

import io
import math
import os
import sys


from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "FLUX.1-Kontext pipeline folder (diffusers layout).")
_LORA = flags.DEFINE_string("lora", None, "LoRA safetensors file to apply to the transformer.")
_LORA_ALPHA = flags.DEFINE_float("lora_alpha", None, "LoRA alpha, only for a file without rank/alpha metadata.")
_IMAGE = flags.DEFINE_string("image", None, "Source image.")
_INSTRUCTION = flags.DEFINE_string("instruction", None, "Edit instruction.")
_OUT = flags.DEFINE_string("out", None, "Output image path (PNG recommended).")
_STEPS = flags.DEFINE_integer("steps", 28, "Sampling steps.")
_GUIDANCE = flags.DEFINE_float("guidance", 3.5, "Guidance-embedding value.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial noise.")
_SAMPLER = flags.DEFINE_enum("sampler", "euler", ["euler", "dpm2", "sde"], "Solver.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute and parameter dtype.")
_AUTO_RESIZE = flags.DEFINE_bool("auto_resize", True, "Resize the input to the closest Kontext training resolution "
                                 "(else only floor its sides to multiples of 16).")
flags.mark_flags_as_required(["model", "image", "instruction", "out"])


def check_args(model: str, image: str, instruction: str, out: str, lora: str | None, steps: int,
               guidance: float):
  """Every argument checked before any model loads (a bad --out would lose the edit); -> the decoded source.

  Raises ValueError naming the flag.
  """
  from PIL import Image

  from editr1_jax import images

  if not os.path.isdir(model):
    raise ValueError(f"--model: {model} is not a folder")
  if lora is not None and not os.path.isfile(lora):
    raise ValueError(f"--lora: {lora} not found")
  if not instruction.strip():
    raise ValueError("--instruction is empty")
  if steps < 1:
    raise ValueError(f"--steps must be >= 1, got {steps}")
  if not (math.isfinite(guidance) and guidance >= 0):
    raise ValueError(f"--guidance must be a finite number >= 0, got {guidance}")
  ext = os.path.splitext(out)[1].lower()
  fmt = Image.registered_extensions().get(ext)
  if fmt is None or fmt not in Image.SAVE:
    raise ValueError(f"--out: {out} has no image extension PIL can write (e.g. .png)")
  try:
    Image.new("RGB", (16, 16)).save(io.BytesIO(), format=fmt)
  except (OSError, ValueError) as e:
    raise ValueError(f"--out: PIL cannot write an RGB image as {fmt}: {e}") from e
  if os.path.isdir(out):
    raise ValueError(f"--out: {out} is a folder")
  parent = os.path.dirname(os.path.abspath(out))
  while not os.path.exists(parent):  # the nearest existing folder must let us create the rest
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"--out: cannot write under {parent}")
  try:
    return images.load_rgb(image)
  except images.ImageError as e:
    raise ValueError(f"--image: {e}") from e


def edit(model: str, image: str, instruction: str, out: str, *, lora: str | None = None,
         lora_alpha: float | None = None, steps: int = 28, guidance: float = 3.5, seed: int = 0,
         sampler: str = "euler", dtype: str = "bfloat16", auto_resize: bool = True) -> str:
  """Check the arguments, load the pipeline, edit `image` by `instruction` with a progress bar, write `out`;
  returns `out`."""
  source = check_args(model, image, instruction, out, lora, steps, guidance)
  import jax
  from PIL import Image
  from tqdm import tqdm

  from editr1_jax.metrics import to_uint8
  from editr1_jax.pipeline import Editor

  pipe = Editor.from_folder(model, dtype=dtype, lora_weights=lora, lora_alpha=lora_alpha)
  with tqdm(total=steps, desc="editing", unit="step") as bar:
    images, _ = pipe([source], [instruction], num_steps=steps, guidance=guidance, seed=seed, solver=sampler,
                     auto_resize=auto_resize, progress=lambda sigma: bar.update(1))
    jax.effects_barrier()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  Image.fromarray(to_uint8(images[0])).save(out)
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
