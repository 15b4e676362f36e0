"""Kontext latent helpers and image preprocessing vs diffusers' FluxKontextPipeline."""

import numpy as np
import pytest
import torch
from helpers import max_rel_err
from PIL import Image
from test_autoencoder import DECODE_BOUND, ENCODE_BOUND, nchw, nhwc, save_reference

from editr1_jax import latents as lt
from editr1_jax.models import autoencoder as ae


@pytest.fixture(scope="module")
def pipe():
  from diffusers import FluxKontextPipeline
  return FluxKontextPipeline  # its helpers are static methods


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A Kontext pipeline holding only a tiny random VAE (all prepare_latents needs), and our VAE."""
  from diffusers import FluxKontextPipeline
  folder = str(tmp_path_factory.mktemp("kontext") / "vae")
  vae = save_reference(folder)
  pipeline = FluxKontextPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                 tokenizer_2=None, transformer=None)
  return pipeline, ae.load_autoencoder(folder)


LATENT = np.random.default_rng(0).standard_normal((2, 6, 10, 16)).astype(np.float32)


def test_pack_equals_diffusers(pipe):
  ref = pipe._pack_latents(nchw(LATENT), 2, 16, 6, 10).numpy()
  out = np.asarray(lt.pack(LATENT))
  assert out.shape == (2, 15, 64)
  np.testing.assert_array_equal(out, ref)


def test_unpack_equals_diffusers(pipe):
  tokens = np.asarray(lt.pack(LATENT))
  vae_scale_factor = 8
  ref = nhwc(pipe._unpack_latents(torch.from_numpy(tokens), 6 * vae_scale_factor, 10 * vae_scale_factor,
                                  vae_scale_factor))
  np.testing.assert_array_equal(np.asarray(lt.unpack(tokens, 6, 10)), ref)
  np.testing.assert_array_equal(ref, LATENT)


def test_pack_rejects_odd_sizes():
  with pytest.raises(ValueError, match="even"):
    lt.pack(LATENT[:, :5])
  with pytest.raises(ValueError, match="6x8"):
    lt.unpack(np.asarray(lt.pack(LATENT)), 6, 8)


def test_ids_equal_diffusers(pipe):
  ref = pipe._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
  np.testing.assert_array_equal(lt.target_ids(3, 5), ref)
  ref[:, 0] = 1  # prepare_latents: "image ids are the same as latent ids with the first dimension set to 1"
  np.testing.assert_array_equal(lt.reference_ids(3, 5), ref)


def test_reference_latents_equal_prepare_latents(reference):
  pipeline, ours = reference
  images = np.random.default_rng(1).uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
  with torch.no_grad():
    _, ref_tokens, ref_target_ids, ref_ids = pipeline.prepare_latents(
        nchw(images), 2, ours.cfg.latent_channels, 24, 40, torch.float32, "cpu", torch.Generator().manual_seed(0))
  tokens, ids = lt.reference_latents(ours, images)
  assert tokens.shape == ref_tokens.shape == (2, 15, 16)
  assert max_rel_err(tokens, ref_tokens.numpy()) <= ENCODE_BOUND  # the VAE's rounding at 28 x 44 covers 24 x 40
  np.testing.assert_array_equal(ids, ref_ids.numpy())
  np.testing.assert_array_equal(lt.target_ids(3, 5), ref_target_ids.numpy())


def test_decode_tokens_equals_pipeline_output_path(reference):
  """The pipeline's tail: _unpack_latents, z / scaling_factor + shift_factor, vae.decode."""
  pipeline, ours = reference
  tokens = np.random.default_rng(2).standard_normal((2, 15, 16)).astype(np.float32)
  with torch.no_grad():
    z = pipeline._unpack_latents(torch.from_numpy(tokens), 24, 40, pipeline.vae_scale_factor)
    z = z / pipeline.vae.config.scaling_factor + pipeline.vae.config.shift_factor
    ref = nhwc(pipeline.vae.decode(z).sample)
  out = np.asarray(lt.decode_tokens(ours, tokens, 6, 10))
  assert out.shape == ref.shape == (2, 24, 40, 3)
  assert max_rel_err(out, ref) <= DECODE_BOUND  # the VAE's rounding at 28 x 44 covers 24 x 40


# --------------------------------------------------------------------------------------------------
def test_preferred_resolutions_equal_diffusers():
  from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
  assert list(lt.PREFERRED_KONTEXT_RESOLUTIONS) == [tuple(r) for r in PREFERRED_KONTEXT_RESOLUTIONS]


def _pipeline_input_size(processor, image, auto_resize):
  """FluxKontextPipeline.__call__, step 3 (preprocess image), as diffusers writes it."""
  from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
  multiple_of = 16
  image_height, image_width = processor.get_default_height_width(image)
  aspect_ratio = image_width / image_height
  if auto_resize:
    _, image_width, image_height = min((abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
  return image_height // multiple_of * multiple_of, image_width // multiple_of * multiple_of


@pytest.mark.parametrize("auto_resize", [True, False])
def test_kontext_resolution_equals_pipeline(auto_resize):
  from diffusers.image_processor import VaeImageProcessor
  processor = VaeImageProcessor(vae_scale_factor=16)
  rng = np.random.default_rng(3)
  sizes = [(512, 512), (17, 900), (1080, 1920), (3000, 41)] + [tuple(s) for s in rng.integers(16, 4000, (50, 2))]
  for height, width in sizes:
    image = Image.new("RGB", (int(width), int(height)))
    assert lt.kontext_resolution(height, width, auto_resize) == _pipeline_input_size(processor, image, auto_resize)


@pytest.mark.parametrize("auto_resize", [True, False])
def test_inference_image_equals_pipeline(tmp_path, auto_resize):
  from diffusers.image_processor import VaeImageProcessor
  processor = VaeImageProcessor(vae_scale_factor=16)
  pixels = np.random.default_rng(4).integers(0, 256, (300, 500, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "source.png")
  image = Image.open(tmp_path / "source.png")
  height, width = _pipeline_input_size(processor, image, auto_resize)
  ref = nhwc(processor.preprocess(processor.resize(image, height, width), height, width))[0]
  out = lt.inference_image(tmp_path / "source.png", auto_resize)
  assert out.dtype == np.float32 and out.shape == ref.shape == (height, width, 3)
  np.testing.assert_array_equal(out, ref)


def test_area_resolution_equals_pipeline():
  """FluxKontextPipeline.__call__'s output size rule, as diffusers writes it (max_area 1024**2)."""
  for height, width in [(1024, 1024), (512, 768), (1080, 1920), (900, 17), (333, 777)]:
    max_area = 1024 ** 2
    aspect_ratio = width / height
    w, h = round((max_area * aspect_ratio) ** 0.5), round((max_area / aspect_ratio) ** 0.5)
    assert lt.area_resolution(height, width) == (h // 16 * 16, w // 16 * 16)
  assert lt.area_resolution(1024, 1024) == (1024, 1024)


def test_training_image_center_crops_then_resizes():
  # a horizontal ramp 0..299 wide, 200 high: the centered 200x200 square holds columns 50..249
  ramp = np.broadcast_to(np.arange(300, dtype=np.float64)[None, :, None] * (255 / 299), (200, 300, 3))
  pixels = np.round(ramp).astype(np.uint8)
  out = lt.training_image(pixels, 100, 100)
  assert out.dtype == np.float32 and out.shape == (100, 100, 3)
  assert out.min() >= -1 and out.max() <= 1
  # output column j samples source column 50 + 2j + 0.5 (Lanczos keeps a linear ramp away from the edges)
  expected = 2 * ((50 + 2 * np.arange(100) + 0.5) * (255 / 299)) / 255 - 1
  assert np.abs(out[50, 5:-5, 0] - expected[5:-5]).max() < 2 / 255
  np.testing.assert_array_equal(out[:, :, 0], out[:1, :, 0].repeat(100, axis=0))


def test_training_image_default_size():
  out = lt.training_image(np.zeros((64, 48, 3), np.uint8))
  assert out.shape == (512, 512, 3)
  np.testing.assert_array_equal(out, -1.0)


def test_bad_image_files_are_named(tmp_path):
  missing = tmp_path / "nope.png"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    lt.training_image(missing)
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"not an image")
  with pytest.raises(ValueError, match=str(garbage)):
    lt.inference_image(garbage)
  with pytest.raises(ValueError, match="uint8"):
    lt.load_image(np.zeros((4, 4), np.float32))
