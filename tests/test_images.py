"""Every PIL mode decodes to the right 8-bit RGB (or an error naming the file), alpha goes over white,
EXIF orientation is applied and an animation gives its first frame."""

import io

import numpy as np
import pytest
from PIL import Image

from editr1_jax import images


def saved(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


def grey16(values, mode: str = "I;16") -> Image.Image:
  """A one-row 16-bit grey image in `mode` (byte order as the mode says)."""
  dtype = {"I;16B": ">u2", "I;16L": "<u2", "I;16": "<u2", "I;16N": "=u2"}[mode]
  return Image.frombytes(mode, (len(values), 1), np.asarray(values, dtype).tobytes())


def rgb(data: bytes) -> np.ndarray:
  out = images.load_rgb(data, "test image")
  assert out.mode == "RGB"
  return np.asarray(out)


def over_white(colour, alpha) -> np.ndarray:
  """The exact result of compositing `colour` at `alpha` (0..255) over white."""
  return np.rint(np.asarray(colour) * alpha / 255 + 255 * (1 - alpha / 255))


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I;16", "TIFF")])
def test_16_bit_grey_scales_by_257(mode, fmt):
  values = [0, 257 * 100, 32768, 65535]
  decoded = rgb(saved(grey16(values, mode), fmt))
  np.testing.assert_array_equal(decoded[0], np.repeat([[0], [100], [128], [255]], 3, axis=1))


def test_native_16_bit_and_32_bit_integers():
  native = images.to_rgb(grey16([32768, 65535], "I;16N"), "x")
  np.testing.assert_array_equal(np.asarray(native)[0], [[128] * 3, [255] * 3])
  wide = Image.fromarray(np.asarray([[0, 32768, 65535]], np.int32))
  assert wide.mode == "I"
  np.testing.assert_array_equal(rgb(saved(wide, "TIFF"))[0], np.repeat([[0], [128], [255]], 3, axis=1))


@pytest.mark.parametrize("value", [-1, 70000])
def test_32_bit_integers_outside_16_bit_are_named(value):
  data = saved(Image.fromarray(np.asarray([[0, value]], np.int32)), "TIFF")
  span = rf"\[{min(0, value)}, {max(0, value)}\]"
  with pytest.raises(images.ImageError, match=rf"^a.tif: integer image values span {span}; expected 0..65535"):
    images.load_rgb(data, "a.tif")


def test_float_in_unit_range_scales_by_255():
  data = saved(Image.fromarray(np.asarray([[0.0, 0.25, 0.5, 1.0]], np.float32)), "TIFF")
  np.testing.assert_array_equal(rgb(data)[0], np.repeat([[0], [64], [128], [255]], 3, axis=1))


@pytest.mark.parametrize("values,span", [([0.0, 1.5], r"\[0.0, 1.5\]"), ([-0.5, 0.5], r"\[-0.5, 0.5\]"),
                                         ([np.nan, 0.5], r"\[nan, nan\]")])
def test_float_outside_unit_range_is_named(tmp_path, values, span):
  path = tmp_path / "f.tif"
  Image.fromarray(np.asarray([values], np.float32)).save(path)
  with pytest.raises(images.ImageError, match=rf"{path}: float image values span {span}; expected \[0, 1\]"):
    images.load_rgb(path)


@pytest.mark.parametrize("mode,fmt,pixel,expect", [
    ("1", "PNG", 1, (255, 255, 255)),
    ("L", "PNG", 77, (77, 77, 77)),
    ("RGB", "PNG", (10, 20, 30), (10, 20, 30)),
    ("CMYK", "TIFF", (0, 255, 255, 0), (255, 0, 0)),
    ("CMYK", "TIFF", (0, 0, 0, 255), (0, 0, 0)),
    ("YCbCr", "TIFF", (128, 128, 128), (128, 128, 128)),
])
def test_opaque_modes(mode, fmt, pixel, expect):
  image = Image.new(mode, (3, 2), pixel)
  assert Image.open(io.BytesIO(saved(image, fmt))).mode == mode
  np.testing.assert_array_equal(rgb(saved(image, fmt)), np.broadcast_to(expect, (2, 3, 3)))


def test_rgbx_ignores_the_padding_band():
  image = Image.merge("RGBX", [Image.new("L", (2, 2), v) for v in (10, 20, 30, 0)])
  np.testing.assert_array_equal(np.asarray(images.to_rgb(image, "x")), np.broadcast_to((10, 20, 30), (2, 2, 3)))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_and_without_transparency(fmt):
  image = Image.new("P", (2, 1))
  image.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
  image.putpixel((1, 0), 1)
  np.testing.assert_array_equal(rgb(saved(image, fmt))[0], [[200, 10, 10], [10, 200, 10]])
  np.testing.assert_array_equal(rgb(saved(image, fmt, transparency=0))[0], [[255, 255, 255], [10, 200, 10]])


def test_palette_alpha_table_goes_over_white():
  image = Image.new("P", (1, 1))
  image.putpalette([200, 10, 10] + [0] * 765)
  decoded = rgb(saved(image, "PNG", transparency=bytes([64])))  # a per-entry alpha (tRNS) table
  np.testing.assert_allclose(decoded[0, 0], over_white((200, 10, 10), 64), atol=1)


def test_palette_alpha_mode():
  image = Image.new("RGBA", (1, 1), (200, 10, 10, 64)).convert("PA")
  data = saved(image, "TIFF")
  assert Image.open(io.BytesIO(data)).mode == "PA"
  np.testing.assert_allclose(rgb(data)[0, 0], over_white((200, 10, 10), 64), atol=1)


@pytest.mark.parametrize("mode,fmt,pixel,colour,alpha", [
    ("LA", "PNG", (0, 128), (0, 0, 0), 128),
    ("RGBA", "PNG", (200, 100, 0, 64), (200, 100, 0), 64),
    ("RGBA", "PNG", (200, 100, 0, 0), (200, 100, 0), 0),
    ("RGBA", "WEBP", (200, 100, 0, 191), (200, 100, 0), 191),
])
def test_alpha_goes_over_white(mode, fmt, pixel, colour, alpha):
  data = saved(Image.new(mode, (2, 2), pixel), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
  assert Image.open(io.BytesIO(data)).mode == mode
  np.testing.assert_allclose(rgb(data), np.broadcast_to(over_white(colour, alpha), (2, 2, 3)), atol=1)


@pytest.mark.parametrize("mode,pixel,colour", [("La", (64, 128), (127.5,) * 3), ("RGBa", (100, 50, 0, 128),
                                                                                   (199.2, 99.6, 0))])
def test_premultiplied_alpha_goes_over_white(mode, pixel, colour):
  """No format PIL writes keeps these modes (TIFF with associated alpha opens as them): built in memory."""
  decoded = np.asarray(images.to_rgb(Image.new(mode, (1, 1), pixel), "x"))
  np.testing.assert_allclose(decoded[0, 0], over_white(colour, 128), atol=1)


def test_colour_key_transparency_goes_over_white():
  np.testing.assert_array_equal(rgb(saved(Image.new("L", (1, 1), 7), "PNG", transparency=7))[0, 0], [255] * 3)
  np.testing.assert_array_equal(rgb(saved(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG", transparency=(1, 2, 3)))[0, 0],
                                [255] * 3)
  decoded = rgb(saved(grey16([5, 32768]), "PNG", transparency=5))
  np.testing.assert_array_equal(decoded[0], [[255] * 3, [128] * 3])


def test_animation_gives_the_first_frame():
  frames = [Image.new("RGB", (2, 2), c) for c in ((255, 0, 0), (0, 0, 255))]
  data = saved(frames[0], "GIF", save_all=True, append_images=frames[1:])
  assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
  np.testing.assert_array_equal(rgb(data), np.broadcast_to((255, 0, 0), (2, 2, 3)))


def test_exif_orientation_is_applied():
  pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # 2 rows x 3 columns
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: the stored image must be turned 90 degrees clockwise to display
  decoded = rgb(saved(Image.fromarray(pixels), "PNG", exif=exif))
  np.testing.assert_array_equal(decoded, np.rot90(pixels, k=-1))


def test_unsupported_mode_and_bad_files_are_named(tmp_path):
  path = tmp_path / "lab.tif"
  Image.new("LAB", (2, 2)).save(path)
  with pytest.raises(images.ImageError, match=rf"^{path}: image mode LAB is not supported"):
    images.load_rgb(path)
  with pytest.raises(images.ImageError, match=rf"^{tmp_path / 'none.png'}: image not found"):
    images.load_rgb(tmp_path / "none.png")
  with pytest.raises(images.ImageError, match=r"^record 3: unreadable image"):
    images.load_rgb(b"not an image", "record 3")
