"""Qwen2-VL processor in NumPy/PIL: image parity with transformers' PIL processor, chat formatting parity
with `apply_chat_template` + image-pad expansion, left padding, and the errors that name their source."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from qwen_fixtures import random_image, reference_chat_ids, write_preprocessor_config, write_tokenizer

from editr1_jax.reward import processor as proc

# (min_pixels, max_pixels): shrink the large images / enlarge the small one / the Qwen2.5-VL defaults.
BOUNDS = {"shrink": (28 * 28 * 4, 28 * 28 * 8), "enlarge": (28 * 28 * 8, 28 * 28 * 26), "qwen": (3136, 12845056)}
SIZES = ((97, 131), (300, 41), (20, 30), (64, 64))


def reference_processor(folder):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  return Qwen2VLImageProcessorPil.from_pretrained(folder)


@pytest.mark.parametrize("bounds", sorted(BOUNDS))
def test_pixel_values_equal_transformers(tmp_path, bounds):
  write_preprocessor_config(str(tmp_path), *BOUNDS[bounds])
  images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
  ref = reference_processor(str(tmp_path))(images)
  cfg = proc.ImageProcessorConfig.from_folder(str(tmp_path))
  pixel_values, grid_thw = proc.preprocess_images(images, cfg)
  np.testing.assert_array_equal(grid_thw, ref["image_grid_thw"])
  assert pixel_values.dtype == np.float32 and pixel_values.shape == ref["pixel_values"].shape
  np.testing.assert_array_equal(pixel_values, ref["pixel_values"])  # same operations in the same order: exact
  sides = grid_thw[:, 1:] * cfg.patch_size
  assert (sides % cfg.factor == 0).all()
  rounded = [(round(h / cfg.factor) * cfg.factor, round(w / cfg.factor) * cfg.factor) for h, w in SIZES]
  assert any(tuple(s) != r for s, r in zip(sides.tolist(), rounded))  # a pixel bound changed some size


def test_size_field_and_transparency_equal_transformers(tmp_path):
  """`size.shortest_edge/longest_edge` as transformers 5 saves it; RGBA composited on white; uint8 arrays."""
  with open(tmp_path / "preprocessor_config.json", "w") as f:
    json.dump({"size": {"shortest_edge": 3136, "longest_edge": 28 * 28 * 6}}, f)
  rgba = np.random.default_rng(0).integers(0, 256, (45, 70, 4), dtype=np.uint8)
  images = [Image.fromarray(rgba, mode="RGBA"), np.asarray(random_image(50, 33, seed=5))]
  ref = reference_processor(str(tmp_path))(images)
  pixel_values, grid_thw = proc.preprocess_images(images, proc.ImageProcessorConfig.from_folder(str(tmp_path)))
  np.testing.assert_array_equal(grid_thw, ref["image_grid_thw"])
  np.testing.assert_array_equal(pixel_values, ref["pixel_values"])


def test_still_image_is_repeated_in_time():
  cfg = proc.ImageProcessorConfig(min_pixels=3136, max_pixels=3136 * 4)
  patches, grid = proc.preprocess_image(random_image(56, 84), cfg)
  assert grid == (1, 4, 6) and patches.shape == (24, cfg.patch_dim)
  per_time = patches.reshape(24, 3, cfg.temporal_patch_size, -1)
  np.testing.assert_array_equal(per_time[:, :, 0], per_time[:, :, 1])


@pytest.mark.parametrize("content,needle", [
    ({}, "'min_pixels'"),
    ({"min_pixels": 3136}, "'max_pixels'"),
    ({"min_pixels": "3136", "max_pixels": 9000}, "'min_pixels' must be a positive integer"),
    ({"min_pixels": 9000, "max_pixels": 3136}, "exceeds max_pixels"),
    ({"min_pixels": 3136, "max_pixels": 9000, "do_normalize": False}, "'do_normalize'"),
    ({"min_pixels": 3136, "max_pixels": 9000, "image_mean": [0.5, 0.5]}, "'image_mean'"),
    ({"min_pixels": 3136, "max_pixels": 9000, "resample": 99}, "'resample'"),
])
def test_config_errors_name_file_and_field(tmp_path, content, needle):
  path = tmp_path / "preprocessor_config.json"
  path.write_text(json.dumps(content))
  with pytest.raises(proc.ProcessorError) as e:
    proc.ImageProcessorConfig.from_folder(str(tmp_path))
  assert str(path) in str(e.value) and needle in str(e.value)


def test_config_missing_or_malformed_file(tmp_path):
  with pytest.raises(proc.ProcessorError, match="preprocessor_config.json: image processor config not found"):
    proc.ImageProcessorConfig.from_folder(str(tmp_path))
  (tmp_path / "preprocessor_config.json").write_text("{not json")
  with pytest.raises(proc.ProcessorError, match="preprocessor_config.json: not valid JSON"):
    proc.ImageProcessorConfig.from_folder(str(tmp_path))


def test_read_image_is_lossless_and_errors_name_the_file(tmp_path):
  image = random_image(31, 17, seed=3)
  image.save(tmp_path / "a.png")
  np.testing.assert_array_equal(np.asarray(proc.read_image(str(tmp_path / "a.png"))), np.asarray(image))
  with pytest.raises(proc.ProcessorError, match=f"{tmp_path / 'missing.png'}: image not found"):
    proc.read_image(str(tmp_path / "missing.png"))
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  with pytest.raises(proc.ProcessorError, match=f"{tmp_path / 'bad.png'}: unreadable image"):
    proc.read_image(str(tmp_path / "bad.png"))
  with pytest.raises(proc.ProcessorError, match="uint8"):
    proc.to_rgb(np.zeros((4, 4, 3), np.float32))


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen_tokenizer"))
  write_tokenizer(folder)
  write_preprocessor_config(folder)
  return folder


@pytest.mark.parametrize("text", ["Replace the cat with a fox.\nRequirement: keep  the sky, 12 345!",
                                  "  leading spaces, émoji 🦊 and tabs\t"])
def test_chat_ids_equal_transformers(chat_folder, text):
  cfg = proc.ImageProcessorConfig.from_folder(chat_folder)
  chat = proc.ChatFormatter(chat_folder, cfg)
  grids = [(1, 6, 10), (1, 4, 4)]
  ids = chat.encode(text, grids)
  from transformers import AutoTokenizer
  assert ids.tolist() == reference_chat_ids(AutoTokenizer.from_pretrained(chat_folder), text, grids)
  assert (ids == chat.image_token_id).sum() == 15 + 4


def test_digits_are_single_tokens(chat_folder):
  chat = proc.ChatFormatter(chat_folder, proc.ImageProcessorConfig.from_folder(chat_folder))
  assert [chat.single_token_id(str(d)) for d in range(6)] == list(range(15, 21))  # as in the Qwen2 vocabulary
  with pytest.raises(proc.ProcessorError, match="'10' is not a single token"):
    chat.single_token_id("10")


def test_special_token_in_text_is_an_error(chat_folder):
  chat = proc.ChatFormatter(chat_folder, proc.ImageProcessorConfig.from_folder(chat_folder))
  with pytest.raises(proc.ProcessorError, match="special token '<\\|image_pad\\|>'"):
    chat.encode("add a <|image_pad|> here", [(1, 4, 4)])


def test_template_without_image_pads_is_an_error(tmp_path):
  write_tokenizer(str(tmp_path), chat_template="{% for m in messages %}{{ m['role'] }}{% endfor %}")
  chat = proc.ChatFormatter(str(tmp_path), proc.ImageProcessorConfig(min_pixels=3136, max_pixels=9000))
  with pytest.raises(proc.ProcessorError, match="chat_template.jinja: the chat template rendered 0"):
    chat.encode("x", [(1, 4, 4), (1, 4, 4)])


def test_missing_tokenizer_or_template(tmp_path):
  cfg = proc.ImageProcessorConfig(min_pixels=3136, max_pixels=9000)
  with pytest.raises(proc.ProcessorError, match="tokenizer.json: tokenizer not found"):
    proc.ChatFormatter(str(tmp_path), cfg)
  write_tokenizer(str(tmp_path))
  os.remove(tmp_path / "chat_template.jinja")
  with pytest.raises(proc.ProcessorError, match="no chat template"):
    proc.ChatFormatter(str(tmp_path), cfg)


def test_pad_left_puts_every_answer_at_the_last_position():
  rows = [np.array([5, 6, 7], np.int32), np.array([8], np.int32)]
  ids, mask, positions = proc.pad_left(rows, length=4, pad_id=0)
  np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  np.testing.assert_array_equal(positions, [3, 3])
  with pytest.raises(proc.ProcessorError, match="shorter than the longest row"):
    proc.pad_left(rows, length=2)


def test_judge_folder_in_a_bucket_reads_as_locally(gcs, tmp_path, monkeypatch):
  """The demo judge's folder copied into a bucket: the same image processor config, chat formatting (tokenizer,
  template, special tokens), stop tokens and judging prompt as the local folder, with nothing copied locally."""
  from editr1_jax import generation, paths, tiny
  from editr1_jax.reward import mllm
  monkeypatch.setenv("EDITR1_CACHE", str(tmp_path / "cache"))
  local = os.path.join(os.path.dirname(tiny.ASSETS), "demo", "judge")
  url = gcs.upload(local)
  cfg = proc.ImageProcessorConfig.from_folder(url)
  assert cfg == proc.ImageProcessorConfig.from_folder(local)
  remote, here = proc.ChatFormatter(url, cfg), proc.ChatFormatter(local, cfg)
  assert (remote.template, remote.template_kwargs) == (here.template, here.template_kwargs)
  assert remote.source == paths.join(url, "tokenizer.json") and remote.template_source.startswith(url)
  text = "Replace the cat with a fox, émoji 🦊"
  assert remote.encode(text, [(1, 4, 6), (1, 2, 2)]).tolist() == here.encode(text, [(1, 4, 6), (1, 2, 2)]).tolist()
  assert generation.stop_tokens(url) == generation.stop_tokens(local)
  prompt = gcs.url("judge_prompt.txt")
  paths.copy_file(os.path.join(os.path.dirname(local), "judge_prompt.txt"), prompt)
  assert mllm.JudgePrompt.from_file(prompt).text == mllm.JudgePrompt.from_file(
      os.path.join(os.path.dirname(local), "judge_prompt.txt")).text
  with pytest.raises(proc.ProcessorError, match=r"gs://editr1-test/.*/none/tokenizer\.json: tokenizer not found"):
    proc.ChatFormatter(gcs.url("none"), cfg)
  assert not (tmp_path / "cache").exists()
