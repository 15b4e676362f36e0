"""Qwen-Image-Edit-2509 conditioning: condition-image sizes and resizes against the pipeline's own functions, prompt
embeddings against diffusers' `QwenImageEditPlusPipeline.encode_prompt` on a tiny pipeline folder read by our loader,
fixed lengths, a mesh, input errors and the encoding cache."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import float32_bound, max_rel_err, perturb_
from qwen_fixtures import random_image, tiny_config

from editr1_jax import qwen_image_conditioning as qic
from editr1_jax import sharding as shd
from editr1_jax import tiny
from editr1_jax.reward import processor as proc

# Qwen-Image-Edit-2509's processor/preprocessor_config.json pixel bounds (Qwen2.5-VL's defaults).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384
# float32 rounding (helpers.float32_bound): the longest reduction is the patch embedding, K = 3 x 2 x 14 x 14 = 1176
# (a 392 x 392 frame of 784 patches and the decoder's sequence are shorter: asserted below); <= 41 reductions in
# sequence: patch 1, 2 vision blocks x 9 (norms, qkv, scores, weighted sum, proj, mlp), merger 3 (norm, fc1, fc2),
# 2 decoder layers x 9, the final norm.
REDUCTION = 3 * 2 * 14 * 14
BOUND = float32_bound(REDUCTION, depth=41)  # 5.2e-5
# Three rows: two instructions of different lengths with one image each, one with two images; four aspect ratios.
ROWS = [("make the sky red", [(300, 500, 1)]),
        ("replace the cat with a fox; keep the background unchanged and remove the car", [(480, 360, 2)]),
        ("remove the car", [(200, 200, 3), (260, 700, 4)])]


def row_images(specs):
  return [random_image(h, w, seed) for h, w, seed in specs]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A Qwen-Image-Edit-2509 folder: text_encoder/ (a perturbed tiny Qwen2_5_VLForConditionalGeneration sized to the
  shipped tiny tokenizer), processor/ and tokenizer/ (that tokenizer; the release's pixel bounds), model_index.json."""
  from tokenizers import Tokenizer
  from transformers import Qwen2_5_VLForConditionalGeneration
  root = str(tmp_path_factory.mktemp("qwen_image_edit"))
  judge = os.path.join(tiny.ASSETS, "judge")
  for sub in ("processor", "tokenizer"):
    shutil.copytree(judge, os.path.join(root, sub))
  tiny.write_qwen_preprocessor_config(os.path.join(root, "processor"), MIN_PIXELS, MAX_PIXELS)
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump({"_class_name": "QwenImageEditPlusPipeline", "processor": ["transformers", "Qwen2VLProcessor"],
               "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
               "tokenizer": ["transformers", "Qwen2Tokenizer"]}, f)
  vocab = Tokenizer.from_file(os.path.join(judge, "tokenizer.json"))
  ids = {t: vocab.token_to_id(t) for t in tiny.QWEN_SPECIAL}
  torch.manual_seed(0)
  model = Qwen2_5_VLForConditionalGeneration(tiny_config(ids)).eval()
  perturb_(model)
  model.save_pretrained(os.path.join(root, "text_encoder"))
  return root


def reference_processor(path: str, tokenizer):
  """transformers' `Qwen2VLProcessor` with the PIL `Qwen2VLImageProcessorPil`, its __init__ skipped: that checks the
  video processor's class, whose module needs torchvision (not installable here). Its __call__ (image processing,
  <|image_pad|> expansion, tokenisation, padding) is transformers' own; only these attributes are set by hand."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
  processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
  processor.tokenizer, processor.chat_template = tokenizer, None
  processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
  processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
  processor.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
  processor.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
  return processor


@pytest.fixture(scope="module")
def pipe(folder):
  """The diffusers pipeline with only its text side (no transformer, VAE, scheduler). transformers 5 computes M-RoPE
  positions only when given `mm_token_type_ids`, which diffusers 0.42 does not pass (it then falls back to
  sequential positions, unlike the transformers 4 the model was trained with); the text encoder's forward adds
  them from input_ids, as the processor makes them."""
  from diffusers import QwenImageEditPlusPipeline
  from transformers import Qwen2_5_VLForConditionalGeneration
  from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
  text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(folder, "text_encoder")).eval()
  image_token = text_encoder.config.image_token_id
  forward = text_encoder.forward
  text_encoder.forward = lambda **kw: forward(**kw, mm_token_type_ids=(kw["input_ids"] == image_token).int())
  tokenizer = Qwen2Tokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
  processor = reference_processor(os.path.join(folder, "processor"),
                                  Qwen2Tokenizer.from_pretrained(os.path.join(folder, "processor")))
  return QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                                   processor=processor, transformer=None)


@pytest.fixture(scope="module")
def encoder(folder):
  return qic.QwenImageTextEncoder.from_pipeline(folder)


def pipeline_encode(pipe, instruction: str, images):
  """One prompt as `QwenImageEditPlusPipeline.__call__` conditions it: its condition-image resize, `encode_prompt`."""
  from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions
  resized = []
  for image in images:
    width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, image.size[0] / image.size[1])
    resized.append(pipe.image_processor.resize(image, height, width))
  with torch.no_grad():
    embeds, mask = pipe.encode_prompt(prompt=instruction, image=resized)
  embeds = embeds[0].numpy()
  return embeds, np.ones(len(embeds), np.int32) if mask is None else mask[0].numpy()


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(300, 500), (512, 512), (1000, 333), (719, 1283), (64, 2000), (1024, 768),
                                          (37, 41)])
def test_sizes_equal_pipeline(height, width):
  from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE,
                                                                          calculate_dimensions)
  for ours, area in ((qic.vl_image_size, CONDITION_IMAGE_SIZE), (qic.vae_image_size, VAE_IMAGE_SIZE)):
    ref_w, ref_h = calculate_dimensions(area, width / height)
    assert ours(height, width) == (ref_h, ref_w)


def test_resize_and_vae_input_equal_pipeline(pipe):
  for height, width, seed in ((300, 500, 0), (719, 1283, 1), (1000, 333, 2)):
    image = random_image(height, width, seed)
    vl_h, vl_w = qic.vl_image_size(height, width)
    expected = np.asarray(pipe.image_processor.resize(image, vl_h, vl_w))
    np.testing.assert_array_equal(np.asarray(qic.resize(image, (vl_h, vl_w))), expected)
    np.testing.assert_array_equal(np.asarray(qic.vl_image(np.asarray(image))), expected)
    vae_h, vae_w = qic.vae_image_size(height, width)
    expected = pipe.image_processor.preprocess(image, vae_h, vae_w)[0].permute(1, 2, 0).numpy()
    ours = qic.vae_image(image)
    assert ours.dtype == np.float32 and ours.shape == (vae_h, vae_w, 3)
    np.testing.assert_array_equal(ours, expected)


def test_encode_equals_pipeline(pipe, encoder):
  instructions = [text for text, _ in ROWS]
  images = [row_images(specs) for _, specs in ROWS]
  embeds, mask = encoder(instructions, images)
  refs = [pipeline_encode(pipe, text, row) for text, row in zip(instructions, images)]
  lengths = [len(e) for e, _ in refs]
  assert len(set(lengths)) == len(lengths), lengths  # every row padded differently
  assert max(lengths) + encoder.drop < REDUCTION  # the bound's longest reduction (BOUND above)
  ref = np.zeros((len(refs), max(lengths), refs[0][0].shape[1]), np.float32)
  ref_mask = np.zeros(ref.shape[:2], np.int32)
  for i, (e, m) in enumerate(refs):
    ref[i, :len(e)], ref_mask[i, :len(m)] = e, m
  assert embeds.dtype == np.float32 and mask.dtype == np.int32
  np.testing.assert_array_equal(mask, ref_mask)
  err = max_rel_err(embeds, ref)
  print(f"prompt_embeds max_rel_err {err:.2e} (bound {BOUND:.1e}), lengths {lengths}")
  assert err <= BOUND

  # A fixed length: the same rows, zero-padded further; one compile for any prompt up to that length.
  fixed = qic.QwenImageTextEncoder(encoder.model, encoder.tokenizer, encoder.image_cfg,
                                   max_sequence_length=max(lengths) + 9)
  long_embeds, long_mask = fixed(instructions, images)
  assert long_embeds.shape == (len(refs), max(lengths) + 9, ref.shape[2])
  np.testing.assert_array_equal(long_mask[:, :max(lengths)], ref_mask)
  assert not long_mask[:, max(lengths):].any() and not np.asarray(long_embeds[:, max(lengths):]).any()
  assert max_rel_err(long_embeds[:, :max(lengths)], ref) <= BOUND


def test_mesh_pads_rows_to_the_data_width(folder, encoder):
  """Three rows on 8 devices (data 2 x fsdp 2 x tensor 2): padded to 4 rows, split, the same three rows back."""
  mesh = shd.make_mesh((2, 2, 2))
  sharded = qic.QwenImageTextEncoder.from_pipeline(folder, mesh=mesh)
  instructions = ["make the sky red", "remove the car", "make the sky red and remove the car"]
  images = [[random_image(200, 300, seed)] for seed in range(3)]
  embeds, mask = sharded(instructions, images)
  ref, ref_mask = encoder(instructions, images)
  np.testing.assert_array_equal(mask, ref_mask)
  assert embeds.shape == ref.shape and max_rel_err(embeds, ref) <= BOUND


def test_bad_input_errors(encoder):
  image = random_image(100, 120)
  fixed = qic.QwenImageTextEncoder(encoder.model, encoder.tokenizer, encoder.image_cfg, max_sequence_length=8)
  long = "replace the cat with a fox; keep the background unchanged"
  with pytest.raises(ValueError, match=r"max_sequence_length 8 .*replace the cat with a fox; keep the bac\.\.\."):
    fixed(["make", long], [[image], [image]])
  with pytest.raises(ValueError, match="row 1: 0 condition images"):
    encoder(["a", "b"], [[image], []])
  with pytest.raises(ValueError, match="row 0: 4 condition images"):
    encoder(["a"], [[image] * 4])
  with pytest.raises(ValueError, match="one row of images each"):
    encoder(["a", "b"], [[image]])
  with pytest.raises(TypeError, match=r"rows \[1\]"):
    encoder(["a", 3], [[image], [image]])
  with pytest.raises(ValueError, match="must not hold vision tokens"):
    encoder(["put <|image_pad|> here"], [[image]])
  with pytest.raises(proc.ProcessorError, match="row 0 .*uint8"):
    encoder(["a"], [[np.zeros((32, 32, 3), np.float32)]])
  with pytest.raises(ValueError, match="max_sequence_length must be in"):
    qic.QwenImageTextEncoder(encoder.model, encoder.tokenizer, encoder.image_cfg, max_sequence_length=2048)
  with pytest.raises(ValueError, match="fewer than drop 100000"):
    qic.QwenImageTextEncoder(encoder.model, encoder.tokenizer, encoder.image_cfg, drop=100_000)
  with pytest.raises(ValueError, match="fixed max_sequence_length"):
    qic.ConditionCache(encoder)


def test_cache_encodes_each_pair_once(encoder):
  fixed = qic.QwenImageTextEncoder(encoder.model, encoder.tokenizer, encoder.image_cfg, max_sequence_length=512)
  a, b, c = (random_image(200, 300, seed) for seed in (10, 11, 12))  # one size: one compile
  direct, direct_mask = fixed(["make the sky red", "remove the car"], [[a], [b]])
  forwards = []
  step = fixed._step
  fixed._step = lambda *args: forwards.append(len(args[-1])) or step(*args)
  cache = qic.ConditionCache(fixed, max_entries=2)
  embeds, mask = cache(["make the sky red", "remove the car", "make the sky red"], [[a], [b], [np.asarray(a)]], chunk=2)
  assert cache.misses == 2 and forwards == [2]  # two distinct pairs, one call of two rows
  np.testing.assert_array_equal(embeds[0], embeds[2])
  np.testing.assert_array_equal(mask[:2], direct_mask)
  assert max_rel_err(embeds[:2], direct) <= BOUND
  again, _ = cache(["make the sky red"], [a.copy()], chunk=2)  # the same pair again (another object): no forward
  assert cache.misses == 2 and forwards == [2]
  np.testing.assert_array_equal(again[0], embeds[0])
  cache(["make the sky blue"], [[a]], chunk=2)  # same image, new instruction: a new pair; evicts the oldest
  cache(["remove the car"], [[b]], chunk=2)
  cache(["make the sky red"], [[c]], chunk=2)  # same instruction, new image
  assert cache.misses == 5 and forwards == [2, 2, 2, 2]
