"""Draw the shipped demo dataset: coloured shapes with colour-editing instructions.

  python -m editr1_jax.data.make_demo [--out editr1_jax/data/demo]   (a gs://bucket/... URL works too)

Every instruction names a target colour, so a programmatic reward (closeness of the edited image's
colour to the named one) can stand in for the MLLM in CPU demos and learning tests.
"""

import argparse
import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from editr1_jax import paths

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZE = 64


def draw(shape: str, fill, background, rng) -> Image.Image:
  im = Image.new("RGB", (SIZE, SIZE), background)
  d = ImageDraw.Draw(im)
  r = int(rng.integers(14, 22))
  cx, cy = (int(v) for v in rng.integers(r + 2, SIZE - r - 2, size=2))
  if shape == "circle":
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == "square":
    d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
  else:
    d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
  return im


def make(out: str, n_train: int = 32, n_test: int = 8, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  names = list(COLOURS)
  for split, n in (("train", n_train), ("test", n_test)):
    lines = []
    for i in range(n):
      shape = SHAPES[int(rng.integers(len(SHAPES)))]
      src, bg, target = rng.choice(len(names), 3, replace=False)
      im = draw(shape, COLOURS[names[src]], COLOURS[names[bg]], rng)
      rel = f"images/{split}_{i:03d}.png"
      buf = io.BytesIO()
      im.save(buf, format="PNG", optimize=True)
      paths.write_bytes(paths.join(out, rel), buf.getvalue())
      if i % 2 == 0:
        prompt = f"Make the {shape} {names[target]}."
        requirement = f"Only the {shape} changes colour, to {names[target]}; its shape, size, position and the background stay the same."
        category = "adjust"
      else:
        prompt = f"Change the background to {names[target]}."
        requirement = f"Only the background becomes {names[target]}; the {names[src]} {shape} is unchanged."
        category = "background"
      lines.append(json.dumps({"prompt": prompt, "image": rel, "requirement": requirement, "category": category}))
    paths.write_text(paths.join(out, f"{split}_metadata.jsonl"), "\n".join(lines) + "\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "demo"))
  args = parser.parse_args()
  make(args.out)


if __name__ == "__main__":
  main()
