"""Image files and bytes -> the 8-bit RGB every model here takes, the same way for the dataset, the Kontext
pipeline (launch/edit.py) and the judge (launch/score.py).

- EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), as diffusers' `load_image` does.
- An animated image gives its first frame.
- Transparency (an alpha band, premultiplied or not, or a palette / colour-key `transparency`) is composited
  over white: what the image looks like on a page, and what the judge's processor (transformers'
  `convert_rgb`) does, so editor and judge see the same picture.
- 16-bit grey (I;16, I;16B, I;16L, I;16N) and 32-bit integer (I, which must hold 0..65535) scale to 0..255
  as round(v / 257); float (F) must lie in [0, 1] and scales by 255. PIL's own conversions clip these
  instead (a 16-bit mid-grey becomes white).
- Any other mode (LAB, HSV, ...) is an error; PIL's LAB -> RGB conversion is not colorimetric.
Every error names the file (or the `where` the caller gives).
"""

import io
import os

import numpy as np
from PIL import Image, ImageOps

from editr1_jax import paths

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
EIGHT_BIT_MODES = ("1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
WHITE = (255, 255, 255, 255)


class ImageError(ValueError):
  """An image that cannot be read or turned into 8-bit RGB; the message names it."""


def _to_grey(image: Image.Image, where: str) -> Image.Image:
  """A 16/32-bit integer or float image -> L (LA where a colour key marks transparent pixels)."""
  values = np.asarray(image)
  low, high = float(values.min()), float(values.max())
  if image.mode == "F":
    if not (0.0 <= low and high <= 1.0):  # NaN fails too
      raise ImageError(f"{where}: float image values span [{low}, {high}]; expected [0, 1]")
    grey = np.rint(values.astype(np.float64) * 255.0)
  else:
    if low < 0 or high > 65535:
      raise ImageError(f"{where}: integer image values span [{low:.0f}, {high:.0f}]; expected 0..65535")
    grey = np.rint(values.astype(np.float64) / 257.0)
  grey = Image.fromarray(grey.astype(np.uint8))
  key = image.info.get("transparency")
  if isinstance(key, int):
    grey.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8)))
  return grey


def to_rgb(image: Image.Image, where: str) -> Image.Image:
  """An opened PIL image (its current frame) -> a new 8-bit RGB image, by the rules of the module docstring."""
  if image.mode not in WIDE_MODES + EIGHT_BIT_MODES:
    raise ImageError(f"{where}: image mode {image.mode} is not supported; save it as 8-bit RGB")
  image = ImageOps.exif_transpose(image)
  if image.mode in WIDE_MODES:
    image = _to_grey(image, where)
  if image.mode == "La":  # PIL converts premultiplied grey to nothing; RGBa -> RGBA it un-premultiplies
    grey, alpha = image.split()
    image = Image.merge("RGBa", (grey, grey, grey, alpha))
  if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
  return image.convert("RGB")


def load_rgb(source: str | os.PathLike | bytes, where: str | None = None) -> Image.Image:
  """A file (a path or a gs:// URL) or its bytes -> 8-bit RGB; errors name `where` (default: the path)."""
  if isinstance(source, bytes):
    where, stream = where or "image bytes", io.BytesIO(source)
  else:
    path = os.fspath(source)
    where = where or path
    if not paths.isfile(path):
      raise ImageError(f"{where}: image not found")
    stream = io.BytesIO(paths.read_bytes(path))  # one request in a bucket
  try:
    with stream, Image.open(stream) as image:
      return to_rgb(image, where)
  except ImageError:
    raise
  except Exception as e:  # PIL raises many types for corrupt files
    raise ImageError(f"{where}: unreadable image: {e}") from e


def save(image: Image.Image, path: str | os.PathLike) -> None:
  """`image` written to a path or gs:// URL in the format of its extension, atomically (a kill never leaves half
  a file behind)."""
  path = os.fspath(path)
  ext = paths.splitext(path)[1].lower()
  fmt = Image.registered_extensions().get(ext)
  if fmt is None:
    raise ImageError(f"{path}: no image extension PIL can write (e.g. .png)")
  buf = io.BytesIO()
  image.save(buf, format=fmt)
  paths.write_bytes(path, buf.getvalue())
