"""A tiny editing world drawn in code: 64x64 scenes of a background and 1-3 shapes, four kinds of instruction, the
correct target of every instruction drawn by the same code, and a pixel measure of how well an edit did.

Scenes are laid out on the four quadrants ("top left" ...): each shape sits near its quadrant's centre (2 pixels of
jitter, radius 11-13), so shapes never overlap, and an added shape goes to the named corner's quadrant at its
centre with radius 12, so every instruction has exactly one correct result. A scene holds at most one shape of
each kind and no two things of one colour, so "the square" and each colour name are unambiguous.

  python -m editr1_jax.demo.world [--out editr1_jax/data/world]   # rewrite the shipped dataset

The split: an item's combination is (instruction, the colour of the thing it acts on: the shape for recolour and
remove, the background for background and add). A fixed fifth of all combinations (by a hash of the seed and the
combination) is held out: training items never use one, test items always do.
"""

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from editr1_jax import images as imageio
from editr1_jax import paths
from editr1_jax.data.make_demo import COLOURS as DEMO_COLOURS

SIZE = 64
SHAPES = ("circle", "square", "triangle")
# Six of the demo's colours, at least 156 apart in RGB (green-black): a pixel within TOLERANCE of one is 96 or more
# from every other.
COLOURS = {name: DEMO_COLOURS[name] for name in ("red", "green", "blue", "yellow", "white", "black")}
CORNERS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}  # (row, col)
KINDS = ("recolour", "background", "remove", "add")
FLAWS = ("wrong_object", "wrong_colour", "partial", "unchanged", "damaged")
RADII = (11, 12, 13)
# Circles are small (radius 0.55 of the shape's): one of the full radius would fill 78% of the square around it and
# most of the triangle, so a circle drawn for a square or a triangle would differ from it only in thin slivers that
# the measure cannot tell from a blurred edge. At this scale any wrong kind of shape scores 0.7 or less.
CIRCLE_SCALE = 0.55
JITTER = 2
ADDED_RADIUS = 12
HELD_OUT = 0.2
WORLD_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "world")

# The measure (`edit_score`). A pixel is right when its RGB lies within TOLERANCE (Euclidean) of the target's:
# under half the closest two colours' distance, so no pixel is right for two colours, yet wide enough for the
# demo VAE's colour error inside flat regions (measured in train_assets). Pixels within BAND of a colour edge of
# the source or the target are not judged: a lossy VAE smears edges over a pixel or two. An edit passes at
# PASS: a correct edit decoded by the demo VAE scores about 0.98 or more, while half an edit scores about 0.5 and
# a wrong object, a wrong colour or no edit score 0 (their errors cover the whole edit region).
TOLERANCE = 60.0
BAND = 2
PASS = 0.8


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str  # one of SHAPES
  colour: str  # a key of COLOURS
  corner: str  # a key of CORNERS
  radius: int = ADDED_RADIUS
  dx: int = 0  # offset from the quadrant's centre
  dy: int = 0


@dataclasses.dataclass(frozen=True)
class Scene:
  background: str
  shapes: tuple[Shape, ...]

  def shape(self, kind: str) -> Shape:
    return next(s for s in self.shapes if s.kind == kind)

  def colours(self) -> set[str]:
    return {self.background} | {s.colour for s in self.shapes}


@dataclasses.dataclass(frozen=True)
class Edit:
  """One instruction: `kind` with the shape it names (recolour, remove, add), the colour (recolour, background,
  add) and the corner (add)."""

  kind: str
  shape: str | None = None
  colour: str | None = None
  corner: str | None = None

  def prompt(self) -> str:
    return {"recolour": f"Make the {self.shape} {self.colour}.",
            "background": f"Change the background to {self.colour}.",
            "remove": f"Remove the {self.shape}.",
            "add": f"Add a {self.colour} {self.shape} in the {self.corner} corner."}[self.kind]

  def requirement(self, scene: Scene) -> str:
    return {"recolour": f"Only the {self.shape} changes colour, to {self.colour}; its shape, size and position, the "
                        "other shapes and the background stay the same.",
            "background": f"Only the background becomes {self.colour}; every shape keeps its colour, size and "
                          "position.",
            "remove": f"The {self.shape} disappears and the {scene.background} background shows in its place; the "
                      "other shapes stay the same.",
            "add": f"A {self.colour} {self.shape} appears in the {self.corner} corner; the other shapes and the "
                   "background stay the same."}[self.kind]

  def apply(self, scene: Scene) -> Scene:
    """The scene this instruction asks for."""
    if self.kind == "recolour":
      return Scene(scene.background, tuple(dataclasses.replace(s, colour=self.colour) if s.kind == self.shape else s
                                           for s in scene.shapes))
    if self.kind == "background":
      return Scene(self.colour, scene.shapes)
    if self.kind == "remove":
      return Scene(scene.background, tuple(s for s in scene.shapes if s.kind != self.shape))
    return Scene(scene.background, scene.shapes + (Shape(self.shape, self.colour, self.corner),))


@dataclasses.dataclass(frozen=True)
class Item:
  """A source scene, an instruction and the scene it asks for."""

  scene: Scene
  edit: Edit

  @property
  def target(self) -> Scene:
    return self.edit.apply(self.scene)

  @property
  def prompt(self) -> str:
    return self.edit.prompt()

  @property
  def requirement(self) -> str:
    return self.edit.requirement(self.scene)

  @property
  def combination(self) -> tuple[str, str]:
    """(instruction, colour of what it acts on): what the split keeps apart."""
    on_shape = self.edit.kind in ("recolour", "remove")
    return self.prompt, self.scene.shape(self.edit.shape).colour if on_shape else self.scene.background

  def record(self, image: str) -> dict:
    """The dataset line (data/folder.py fields only) with `image` as its path."""
    return {"prompt": self.prompt, "image": image, "requirement": self.requirement, "category": self.edit.kind}


# --------------------------------------------------------------------------------------------------
# Drawing
def _centre(shape: Shape) -> tuple[int, int]:
  row, col = CORNERS[shape.corner]
  return SIZE // 4 + col * SIZE // 2 + shape.dx, SIZE // 4 + row * SIZE // 2 + shape.dy


def draw(scene: Scene) -> np.ndarray:
  """(SIZE, SIZE, 3) uint8, flat colours without anti-aliasing (every pixel is a palette colour)."""
  image = Image.new("RGB", (SIZE, SIZE), COLOURS[scene.background])
  pen = ImageDraw.Draw(image)
  for s in scene.shapes:
    (x, y), r, fill = _centre(s), s.radius, COLOURS[s.colour]
    if s.kind == "circle":
      r = round(CIRCLE_SCALE * r)
      pen.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif s.kind == "square":
      pen.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
      pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
  return np.asarray(image)


# --------------------------------------------------------------------------------------------------
# Random scenes and instructions
def _pick(rng: np.random.Generator, options: Sequence):
  options = sorted(options)
  return options[int(rng.integers(len(options)))]


def random_scene(rng: np.random.Generator, num_shapes: int) -> Scene:
  background = _pick(rng, COLOURS)
  colours = rng.permutation(sorted(set(COLOURS) - {background}))[:num_shapes]
  kinds = rng.permutation(SHAPES)[:num_shapes]
  corners = rng.permutation(sorted(CORNERS))[:num_shapes]
  shapes = tuple(Shape(str(k), str(c), str(q), int(rng.choice(RADII)), *(int(v) for v in
                                                                          rng.integers(-JITTER, JITTER + 1, 2)))
                 for k, c, q in zip(kinds, colours, corners))
  return Scene(str(background), shapes)


def random_item(rng: np.random.Generator, kind: str | None = None) -> Item:
  """A scene and an instruction of `kind` (drawn when None) that changes it."""
  kind = _pick(rng, KINDS) if kind is None else kind
  scene = random_scene(rng, int(rng.integers(1, 3 if kind == "add" else 4)))  # add needs a free corner and shape
  free = sorted(set(COLOURS) - scene.colours())
  if kind == "recolour":
    return Item(scene, Edit(kind, shape=_pick(rng, [s.kind for s in scene.shapes]), colour=_pick(rng, free)))
  if kind == "background":
    return Item(scene, Edit(kind, colour=_pick(rng, free)))
  if kind == "remove":
    return Item(scene, Edit(kind, shape=_pick(rng, [s.kind for s in scene.shapes])))
  return Item(scene, Edit(kind, shape=_pick(rng, set(SHAPES) - {s.kind for s in scene.shapes}),
                          colour=_pick(rng, free), corner=_pick(rng, set(CORNERS) - {s.corner for s in scene.shapes})))


def held_out(combination: tuple[str, str], seed: int) -> bool:
  """Whether a combination belongs to the test side (a stable hash, the same on every machine)."""
  digest = hashlib.sha256(json.dumps([seed, *combination]).encode()).digest()
  return int.from_bytes(digest[:8], "big") < HELD_OUT * 2 ** 64


def items(rng: np.random.Generator, split: str, seed: int, kinds: Sequence[str] = KINDS) -> Iterator[Item]:
  """Endless items of one side of the split ("train" or "test"), of the instruction kinds `kinds` in turn."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  unknown = sorted(set(kinds) - set(KINDS))
  if unknown or not kinds:
    raise ValueError(f"kinds {list(kinds)}: must be a non-empty sequence of {KINDS}")
  for i in range(10 ** 9):
    kind = kinds[i % len(kinds)]
    while True:
      item = random_item(rng, kind)
      if held_out(item.combination, seed) == (split == "test"):
        yield item
        break


def make_items(n: int, split: str, seed: int = 0) -> list[Item]:
  """The first `n` items of the split's stream for `seed`."""
  stream = items(np.random.default_rng([seed, ("train", "test").index(split)]), split, seed)
  return [next(stream) for _ in range(n)]


def texts() -> list[str]:
  """Every instruction and requirement the world can say (what the demo editor's tokenizers are trained on)."""
  out = []
  for shape, colour in itertools.product(SHAPES, COLOURS):
    scene = Scene(colour, ())
    out += [Edit("recolour", shape, colour).prompt(), Edit("recolour", shape, colour).requirement(scene),
            Edit("remove", shape).prompt(), Edit("remove", shape).requirement(scene)]
    for corner in CORNERS:
      out += [Edit("add", shape, colour, corner).prompt(), Edit("add", shape, colour, corner).requirement(scene)]
  for colour in COLOURS:
    out += [Edit("background", colour=colour).prompt(), Edit("background", colour=colour).requirement(Scene(colour, ()))]
  return list(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------------
# Flawed edits (the judge's training data, the measure's tests)
def _half(source: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The target above a cut through the middle third of the changed rows, the source below."""
  rows = np.flatnonzero((source != target).any(-1).any(-1))
  lo, hi = rows.min(), rows.max() + 1
  cut = int(rng.integers(lo + (hi - lo) // 3, hi - (hi - lo) // 3 + 1))
  return np.where(np.arange(SIZE)[:, None, None] < cut, target, source)


def damage(image: np.ndarray, rng: np.random.Generator, style: str | None = None) -> np.ndarray:
  """`image` with visible damage: strong pixel noise (sigma 40-80 a channel) or 3-5 blots of odd colours."""
  style = _pick(rng, ("noise", "blots")) if style is None else style
  if style == "noise":
    noisy = image + rng.normal(0.0, rng.uniform(40.0, 80.0), image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
  out = Image.fromarray(image)
  pen = ImageDraw.Draw(out)
  for _ in range(int(rng.integers(3, 6))):
    x, y = (int(v) for v in rng.integers(4, SIZE - 4, 2))
    r = int(rng.integers(6, 13))
    pen.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(60, 200, 3)))
  return np.asarray(out)


def _other(rng, options, *exclude):
  return _pick(rng, set(options) - set(exclude))


def flawed(item: Item, flaw: str, rng: np.random.Generator) -> np.ndarray:
  """An edit of `item` with one of FLAWS: the wrong thing edited, the right thing in the wrong colour, half the
  edit, no edit, or the correct edit damaged."""
  source, target = draw(item.scene), draw(item.target)
  scene, edit = item.scene, item.edit
  if flaw == "unchanged":
    return source
  if flaw == "partial":
    return _half(source, target, rng)
  if flaw == "damaged":
    return damage(target, rng)
  if flaw not in ("wrong_object", "wrong_colour"):
    raise ValueError(f"flaw must be one of {FLAWS}, got {flaw!r}")
  others = [s for s in scene.shapes if s.kind != edit.shape]
  used = scene.colours()
  if flaw == "wrong_colour":
    if edit.kind == "remove":  # painted over instead of removed
      wrong = Edit("recolour", edit.shape, _other(rng, COLOURS, *used))
    else:
      wrong = dataclasses.replace(edit, colour=_other(rng, COLOURS, *used, edit.colour))
  elif edit.kind == "recolour":
    wrong = Edit("recolour", _pick(rng, [s.kind for s in others]), edit.colour) if others else \
        Edit("background", colour=edit.colour)
  elif edit.kind == "background":
    wrong = Edit("recolour", _pick(rng, [s.kind for s in scene.shapes]), edit.colour)
  elif edit.kind == "remove":
    if others:
      wrong = Edit("remove", _pick(rng, [s.kind for s in others]))
    else:  # the only shape turned into another kind
      s = scene.shapes[0]
      return draw(Scene(scene.background, (dataclasses.replace(s, kind=_other(rng, SHAPES, s.kind)),)))
  else:  # another kind of shape where one is left, else the right one in another free corner
    kinds = set(SHAPES) - {edit.shape} - {s.kind for s in scene.shapes}
    if kinds and rng.integers(2):
      wrong = dataclasses.replace(edit, shape=_pick(rng, kinds))
    else:
      wrong = dataclasses.replace(edit, corner=_other(rng, CORNERS, edit.corner, *(s.corner for s in scene.shapes)))
  return draw(wrong.apply(scene))


# --------------------------------------------------------------------------------------------------
# The measure
def _as_pixels(image, name: str) -> np.ndarray:
  array = np.asarray(image)
  if array.shape != (SIZE, SIZE, 3) or array.dtype != np.uint8:
    raise ValueError(f"{name}: expected a uint8 ({SIZE}, {SIZE}, 3) image, got {array.dtype} {array.shape}")
  return array.astype(np.float32)


def near_edges(image: np.ndarray, band: int) -> np.ndarray:
  """Pixels within `band` (Chebyshev) of a pixel whose right or lower neighbour has another colour."""
  edge = np.zeros(image.shape[:2], bool)
  across = (image[:, 1:] != image[:, :-1]).any(-1)
  down = (image[1:] != image[:-1]).any(-1)
  edge[:, :-1] |= across
  edge[:, 1:] |= across
  edge[:-1] |= down
  edge[1:] |= down
  padded = np.pad(edge, band)
  near = np.zeros_like(edge)
  for dy in range(2 * band + 1):
    for dx in range(2 * band + 1):
      near |= padded[dy:dy + SIZE, dx:dx + SIZE]
  return near


def _judged_errors(source, edit, target) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(judged, changed, wrong) pixel masks: away from edges; where the target differs from the source; off target."""
  source, edit, target = (_as_pixels(x, n) for x, n in ((source, "source"), (edit, "edit"), (target, "target")))
  judged = ~(near_edges(source, BAND) | near_edges(target, BAND))
  return judged, (source != target).any(-1), np.linalg.norm(edit - target, axis=-1) > TOLERANCE


def edit_score(source, edit, target) -> float:
  """1 - (pixels of the edit region left wrong + pixels outside it spoiled) / pixels of the edit region, clipped to
  [0, 1]; the edit region is where target and source differ, pixels near an edge are not counted (TOLERANCE, BAND).
  All three are uint8 (SIZE, SIZE, 3) images; source and target drawn by `draw`."""
  judged, changed, wrong = _judged_errors(source, edit, target)
  region = int((changed & judged).sum())
  if region == 0:
    raise ValueError("target: no pixel away from the edges differs from the source; nothing to measure")
  return float(np.clip(1.0 - int((wrong & judged).sum()) / region, 0.0, 1.0))


def edit_correct(source, edit, target) -> bool:
  return edit_score(source, edit, target) >= PASS


# --------------------------------------------------------------------------------------------------
# The dataset folder
def target_path(image_path: str) -> str:
  """Where an item's target lies: `<folder>/targets/<name>` for the image `<folder>/images/<name>`."""
  normalised = paths.normpath(image_path)
  folder, name = paths.dirname(normalised), paths.basename(normalised)
  if paths.basename(folder) != "images":
    raise ValueError(f"{image_path}: a world image lies in an images/ folder; its target in targets/ next to it")
  return paths.join(paths.dirname(folder), "targets", name)


def targets_for(records: Sequence, folder: str | None = None) -> list[np.ndarray]:
  """The target images (uint8) of dataset records: `data.folder.Record`s, or mappings whose "image" is a path
  (relative ones taken from `folder`)."""
  out = []
  for r in records:
    path = r["image"] if isinstance(r, Mapping) else r.image_path
    if folder is not None and not (os.path.isabs(path) or paths.is_url(path)):
      path = paths.join(folder, path)
    out.append(np.asarray(imageio.load_rgb(target_path(path))))
  return out


def make_dataset(out: str, n_train: int = 384, n_test: int = 64, seed: int = 0) -> None:
  """An Edit-R1 folder (images/, train_metadata.jsonl, test_metadata.jsonl) with each item's target in targets/."""
  for sub in ("images", "targets"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  for split, n in (("train", n_train), ("test", n_test)):
    lines = []
    for i, item in enumerate(make_items(n, split, seed)):
      name = f"{split}_{i:04d}.png"
      Image.fromarray(draw(item.scene)).save(os.path.join(out, "images", name), optimize=True)
      Image.fromarray(draw(item.target)).save(os.path.join(out, "targets", name), optimize=True)
      lines.append(json.dumps(item.record(f"images/{name}")))
    with open(os.path.join(out, f"{split}_metadata.jsonl"), "w") as f:
      f.write("\n".join(lines) + "\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=WORLD_DATA)
  parser.add_argument("--train", type=int, default=384, help="train items")
  parser.add_argument("--test", type=int, default=64, help="test items")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  make_dataset(args.out, args.train, args.test, args.seed)


if __name__ == "__main__":
  main()
