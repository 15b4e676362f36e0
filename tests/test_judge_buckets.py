"""The benchmark judge's length buckets and processor overrides, on a tiny Qwen2.5-VL judge (CPU, float32): the
same answers bucketed and unbucketed, one compile of the generation for prompts of many lengths and image sizes in
one bucket, the image bounds overridden and recorded, bad values refused."""

import json

import jax
import numpy as np
import pytest
from qwen_fixtures import MAX_PIXELS, MIN_PIXELS, random_image

from editr1_jax import generation
from editr1_jax.bench.judge import QwenJudge
from editr1_jax.reward import processor as proc

TEXTS = ("Rate the edit.", "Instruction: make the sky red. Rate the edit from 0 to 5 and answer with the digit only.",
         "Instruction: remove the car; keep the background unchanged. Rate the edit from 0 to 5.")


@pytest.fixture(scope="module")
def folder(qwen_reference):
  return qwen_reference[1]


def requests(sizes, texts=TEXTS):
  """One request per image sizes, the texts in turn, the text first in every other one."""
  return [(texts[i % len(texts)], [random_image(h, w, seed=10 * i + j) for j, (h, w) in enumerate(images)], i % 2 == 1)
          for i, images in enumerate(sizes)]


def test_bucketed_answers_equal_unbucketed(folder):
  """Batches of two (the last padded), one or two images per request: the answers of exact shapes."""
  reqs = requests([((64, 64), (97, 131)), ((300, 41),), ((60, 90), (64, 64)), ((131, 97),), ((90, 60), (41, 300))])
  exact = QwenJudge(folder, max_new_tokens=6, batch_size=2, dtype="float32", buckets_per_octave=None).answer(reqs)
  assert len(set(exact)) > 1  # distinct answers: a mix-up of rows would show
  for per_octave in (1, 4):
    judge = QwenJudge(folder, max_new_tokens=6, batch_size=2, dtype="float32", buckets_per_octave=per_octave)
    assert judge.answer(reqs) == exact


def test_one_compile_per_bucket(folder):
  """Prompts of five lengths (65 to 80 tokens: 15 or 16 image tokens, the larger image 11 or 12) whose bucketed shapes
  agree: one compile of the generation; exact shapes, one per prompt."""
  texts = ["Rate the edit from", "Rate the edit from 0 to 5", "Rate the edit from 0 to 5 and answer",
           "Rate the edit from 0 to 5 and answer with the", "Rate the edit."]
  reqs = requests([((64, 64), (300, 41)), ((64, 64), (330, 41)), ((64, 64), (41, 330)), ((64, 64), (320, 41)),
                   ((56, 56), (330, 41))], texts)
  judge = QwenJudge(folder, max_new_tokens=3, dtype="float32")
  batch = lambda r, buckets: generation.chat_batch(judge.chat, [(r[1], r[0], r[2])], judge.model.cfg, buckets=buckets)
  shapes = lambda buckets: {tuple(np.shape(x) for x in jax.tree.leaves(batch(r, buckets))) for r in reqs}
  assert len(shapes(None)) == len(reqs) and len(shapes(judge.buckets)) == 1  # the premise
  compiled = generation._generate._cache_size()
  answers = judge.answer(reqs)
  assert generation._generate._cache_size() - compiled == 1
  exact = QwenJudge(folder, max_new_tokens=3, dtype="float32", buckets_per_octave=None)
  assert exact.answer(reqs) == answers
  assert generation._generate._cache_size() - compiled == 1 + len(reqs)


def test_pixel_bounds_override_and_settings(folder):
  """The folder's bounds keep a 64 x 64 image at 4 x 4 patches; a larger min_pixels resizes it up (the grid the
  model sees), and `settings` records the bounds used."""
  image = random_image(64, 64)
  grid = lambda judge: proc.preprocess_images([image], judge.chat.image_cfg)[1].tolist()
  default = QwenJudge(folder, max_new_tokens=2, dtype="float32")
  assert grid(default) == [[1, 4, 4]]
  assert default.settings == {"folder": folder, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
                              "max_new_tokens": 2, "dtype": "float32", "batch_size": 1, "buckets_per_octave": 2,
                              "decoding": "greedy"}
  judge = QwenJudge(folder, max_new_tokens=2, dtype="float32", min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 64)
  assert grid(judge) == [[1, 8, 8]]
  settings = json.loads(json.dumps(judge.settings))
  assert (settings["min_pixels"], settings["max_pixels"]) == (28 * 28 * 16, 28 * 28 * 64)
  assert len(judge.answer([("Rate the edit.", [image], False)])) == 1
  only_max = QwenJudge(folder, max_new_tokens=2, dtype="float32", max_pixels=MIN_PIXELS)
  assert (only_max.settings["min_pixels"], only_max.settings["max_pixels"]) == (MIN_PIXELS, MIN_PIXELS)


@pytest.mark.parametrize("kwargs, name", [
    ({"min_pixels": 0}, "min_pixels"), ({"max_pixels": -784}, "max_pixels"), ({"min_pixels": 1.5e6}, "min_pixels"),
    ({"max_pixels": True}, "max_pixels"), ({"buckets_per_octave": 0}, "buckets_per_octave"),
    ({"min_pixels": 2000, "max_pixels": 1000}, "min_pixels"), ({"min_pixels": MAX_PIXELS + 1}, "min_pixels"),
    ({"max_pixels": MIN_PIXELS - 1}, "max_pixels")])
def test_bad_values_are_refused(folder, kwargs, name):
  """One ValueError naming the argument; below a bound of the folder's counts as a clash with it."""
  with pytest.raises(ValueError, match=rf"^{name}\b"):
    QwenJudge(folder, **kwargs)
