"""A programmatic reward for demos and learning tests: how close the edit's mean colour is to the
colour named in the instruction. It stands in for the MLLM where a known-learnable signal is wanted.

`colour_scores` is the formula on [-1, 1] float images; `ColourReward` is the same as a `Reward` plug-in
(`config.reward.kind = "colour"`) on uint8 images.
"""

import re

import numpy as np

from editr1_jax.data.make_demo import COLOURS
from editr1_jax.reward.base import RewardResult, register

_MAX_DISTANCE = float(np.sqrt(3.0) * 255.0)
_PATTERN = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)


def named_colour(instruction: str) -> np.ndarray:
  """The RGB of the last colour word of the instruction; an error names the instruction if there is none."""
  found = _PATTERN.findall(instruction)
  if not found:
    raise ValueError(f"instruction {instruction!r} names none of the colours {sorted(COLOURS)}")
  return np.asarray(COLOURS[found[-1].lower()], np.float64)


def colour_scores(images: np.ndarray, instructions) -> np.ndarray:
  """images (B, H, W, 3) in [-1, 1] -> rewards (B,) in [0, 1]: 1 - |mean RGB - named RGB| / max distance."""
  images = np.asarray(images, np.float64)
  mean_rgb = (np.clip(images, -1.0, 1.0).mean(axis=(1, 2)) + 1.0) * 127.5
  targets = np.stack([named_colour(t) for t in instructions])
  return 1.0 - np.linalg.norm(mean_rgb - targets, axis=-1) / _MAX_DISTANCE



class ColourReward:
  """The colour reward as a `Reward`: uint8 edits are read back to [-1, 1] as x / 127.5 - 1 (the inverse of
  `metrics.to_uint8`) and scored by `colour_scores`; the sources and requirements play no part. A score that
  is not finite is invalid (NaN); an instruction that names no colour is an error."""

  def score(self, sources, edits, records, *, progress: str | None = None) -> RewardResult:
    del progress  # one pass over the pixels: nothing to follow
    if not len(sources) == len(edits) == len(records):
      raise ValueError(f"got {len(sources)} sources, {len(edits)} edits and {len(records)} records; they must pair up")
    scores = np.full(len(edits), np.nan, np.float32)
    for i, (edit, record) in enumerate(zip(edits, records)):
      edit = np.asarray(edit)
      if edit.dtype != np.uint8 or edit.ndim != 3 or edit.shape[-1] != 3:
        raise ValueError(f"edit {i}: expected a uint8 (H, W, 3) image, got {edit.dtype} {edit.shape}")
      # one image at a time: never all of them as float64
      scores[i] = colour_scores(edit[None] / 127.5 - 1.0, [record["prompt"]])[0]
    valid = np.isfinite(scores)
    return RewardResult(np.where(valid, scores, np.nan).astype(np.float32), None, valid)


@register("colour")
def build_colour(config, mesh=None, rules=None) -> ColourReward:
  del config, mesh, rules  # no model, no knobs
  return ColourReward()
