"""Kontext latent helpers and image preprocessing, each equal to its diffusers counterpart.

Packing: a NHWC latent (B, h, w, C) becomes (B, (h/2)(w/2), 4C) tokens, row-major over the 2x2
patch grid; token channel `c * 4 + dy * 2 + dx` holds latent channel c at offset (dy, dx) of its
patch. That is exactly diffusers' `_pack_latents` of the NCHW latent (view (B, C, h/2, 2, w/2, 2),
permute to (B, h/2, w/2, C, 2, 2)).

Position ids are (first, row, col) on the packed grid: first = 0 for the target image, 1 for the
reference image (FluxKontextPipeline.prepare_latents). Images are float NHWC in [-1, 1].
"""

import os

import jax
import numpy as np
from PIL import Image, ImageOps

from editr1_jax import images, paths

TARGET, REFERENCE = 0, 1
# diffusers' PREFERRED_KONTEXT_RESOLUTIONS, (width, height): the resolutions Kontext was trained on.
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)
# VAE downsampling (8) times the 2x2 packing: image sides must be multiples of this.
MULTIPLE_OF = 16


# --------------------------------------------------------------------------------------------------
def pack(latents: jax.Array) -> jax.Array:
  """(B, h, w, C) -> (B, (h/2)(w/2), 4C) in diffusers' channel order (see the module docstring)."""
  b, h, w, c = latents.shape
  if h % 2 or w % 2:
    raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
  x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: jax.Array, height: int, width: int) -> jax.Array:
  """(B, (h/2)(w/2), 4C) -> (B, h, w, C) for a latent of `height` x `width` (inverse of `pack`)."""
  b, n, c4 = tokens.shape
  if height % 2 or width % 2 or n != (height // 2) * (width // 2) or c4 % 4:
    raise ValueError(f"{n} tokens of width {c4} cannot unpack to an even {height}x{width} latent")
  x = tokens.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, height, width, c4 // 4)


def grid_ids(first: int, rows: int, cols: int) -> np.ndarray:
  """(rows * cols, 3) float32 position ids (first, row, col), row-major like `pack`."""
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  return np.stack([np.full(r.size, first), r.ravel(), c.ravel()], axis=-1).astype(np.float32)


def target_ids(rows: int, cols: int) -> np.ndarray:
  """Ids of the generated image's tokens on a packed rows x cols grid (latent h/2 x w/2)."""
  return grid_ids(TARGET, rows, cols)


def reference_ids(rows: int, cols: int) -> np.ndarray:
  """Ids of the reference (source) image's tokens: first coordinate 1."""
  return grid_ids(REFERENCE, rows, cols)


def reference_latents(vae, images: jax.Array) -> tuple[jax.Array, np.ndarray]:
  """Source images (B, H, W, 3) in [-1, 1] -> (packed normalised posterior mode (B, L, 4C), ids (L, 3))."""
  z = vae.latent_norm.normalize(vae.encode(images))
  return pack(z), reference_ids(z.shape[1] // 2, z.shape[2] // 2)


def decode_tokens(vae, tokens: jax.Array, height: int, width: int) -> jax.Array:
  """Packed normalised latents of a `height` x `width` latent -> images (B, f*height, f*width, 3) in ~[-1, 1]."""
  return vae.decode(vae.latent_norm.denormalize(unpack(tokens, height, width)))


# --------------------------------------------------------------------------------------------------
def load_image(source) -> Image.Image:
  """An RGB PIL image from a path, a PIL image or a uint8 (H, W, 3) array (`images.to_rgb`: 16-bit, alpha, EXIF)."""
  if isinstance(source, Image.Image):
    return images.to_rgb(source, "source image")
  if isinstance(source, np.ndarray):
    if source.dtype != np.uint8 or source.ndim != 3 or source.shape[-1] != 3:
      raise ValueError(f"an image array must be uint8 (H, W, 3), got {source.dtype} {source.shape}")
    return Image.fromarray(source)
  path = os.fspath(source)
  if not paths.isfile(path):
    raise FileNotFoundError(f"{path}: image file not found")
  return images.load_rgb(path)


def to_array(image: Image.Image) -> np.ndarray:
  """PIL image -> float32 (H, W, 3) in [-1, 1], rounding like diffusers' VaeImageProcessor."""
  return 2.0 * (np.asarray(image, dtype=np.float32) / 255.0) - 1.0


def training_image(source, height: int = 512, width: int = 512) -> np.ndarray:
  """Center crop to the target aspect ratio, Lanczos resize to height x width, -> [-1, 1]."""
  img = ImageOps.fit(load_image(source), (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
  return to_array(img)


def kontext_resolution(height: int, width: int, auto_resize: bool = True) -> tuple[int, int]:
  """(height, width) the Kontext pipeline resizes an input image to: the preferred resolution of the
  closest aspect ratio (or the image's own size), floored to multiples of 16."""
  height, width = height - height % MULTIPLE_OF, width - width % MULTIPLE_OF
  if not height or not width:
    raise ValueError(f"an input image must be at least {MULTIPLE_OF}x{MULTIPLE_OF} pixels")
  if auto_resize:
    _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
  return height // MULTIPLE_OF * MULTIPLE_OF, width // MULTIPLE_OF * MULTIPLE_OF


def area_resolution(height: int, width: int, max_area: int = 1024 ** 2) -> tuple[int, int]:
  """The pipeline's output size: the aspect ratio of (height, width) at `max_area` pixels, floored to 16."""
  aspect = width / height
  width, height = round((max_area * aspect) ** 0.5), round((max_area / aspect) ** 0.5)
  return height // MULTIPLE_OF * MULTIPLE_OF, width // MULTIPLE_OF * MULTIPLE_OF


def inference_image(source, auto_resize: bool = True) -> np.ndarray:
  """The Kontext pipeline's input preprocessing: Lanczos resize to `kontext_resolution`, -> [-1, 1]."""
  img = load_image(source)
  height, width = kontext_resolution(img.height, img.width, auto_resize)
  return to_array(img.resize((width, height), resample=Image.Resampling.LANCZOS))
