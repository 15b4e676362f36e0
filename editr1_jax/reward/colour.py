"""A programmatic reward for demos and learning tests: how close the edit's mean colour is to the
colour named in the instruction. It stands in for the MLLM where a known-learnable signal is wanted."""

import re

import numpy as np

from editr1_jax.data.make_demo import COLOURS

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
