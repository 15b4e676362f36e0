"""The demo world: determinism, targets that differ from their sources only where the instruction says, the pixel
measure against right and wrong edits, and a split whose test combinations training never sees."""

import itertools
import json

import numpy as np
import pytest

from editr1_jax.data import folder as data_folder
from editr1_jax.demo import world

N = 48  # items per check: twelve of each kind


@pytest.fixture(scope="module")
def items():
  return world.make_items(N, "train", seed=0)


def _mask(scene_shape: world.Shape) -> np.ndarray:
  """Pixels a shape covers, drawn alone on a background of another colour."""
  background = next(c for c in world.COLOURS if c != scene_shape.colour)
  return (world.draw(world.Scene(background, (scene_shape,))) != world.COLOURS[background]).any(-1)


def test_items_are_deterministic_and_seeded():
  a, b = world.make_items(16, "test", seed=0), world.make_items(16, "test", seed=0)
  assert a == b
  assert all(np.array_equal(world.draw(x.scene), world.draw(y.scene)) for x, y in zip(a, b))
  assert world.make_items(16, "test", seed=1) != a


def test_dataset_is_deterministic(tmp_path):
  for name in ("a", "b"):
    world.make_dataset(str(tmp_path / name), n_train=8, n_test=4, seed=0)
  files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
  assert len(files) == 2 + 2 * (8 + 4)
  assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_scenes_follow_the_layout(items):
  for item in items:
    scene = item.scene
    assert 1 <= len(scene.shapes) <= 3
    assert len({s.kind for s in scene.shapes}) == len({s.colour for s in scene.shapes}) == len(scene.shapes)
    assert scene.background not in {s.colour for s in scene.shapes}
    masks = [_mask(s) for s in scene.shapes]
    assert not any((a & b).any() for a, b in itertools.combinations(masks, 2))  # no overlap
    image = world.draw(scene)
    palette = np.asarray(list(world.COLOURS.values()))
    assert (image[:, :, None] == palette).all(-1).any(-1).all()  # flat palette colours only


def test_palette_is_separated_beyond_the_tolerance():
  distances = [np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(world.COLOURS.values(), 2)]
  assert min(distances) > 2 * world.TOLERANCE  # no pixel is within tolerance of two colours


@pytest.mark.parametrize("kind", world.KINDS)
def test_targets_change_only_what_the_instruction_names(items, kind):
  for item in (i for i in items if i.edit.kind == kind):
    source, target, scene = world.draw(item.scene), world.draw(item.target), item.scene
    changed = (source != target).any(-1)
    if kind == "background":
      shapes = np.any([_mask(s) for s in scene.shapes], axis=0)
      assert np.array_equal(changed, ~shapes)
      assert (target[changed] == world.COLOURS[item.edit.colour]).all()
      continue
    if kind == "add":
      added = world.Shape(item.edit.shape, item.edit.colour, item.edit.corner)
      assert np.array_equal(changed, _mask(added))
      assert (target[changed] == world.COLOURS[item.edit.colour]).all()
      continue
    named = scene.shape(item.edit.shape)
    assert np.array_equal(changed, _mask(named))
    colour = item.edit.colour if kind == "recolour" else scene.background
    assert (target[changed] == world.COLOURS[colour]).all()


def test_measure_accepts_correct_edits(items):
  rng = np.random.default_rng(0)
  for item in items:
    source, target = world.draw(item.scene), world.draw(item.target)
    assert world.edit_score(source, target, target) == 1.0
    noisy = np.clip(np.rint(target + rng.normal(0.0, 12.0, target.shape)), 0, 255).astype(np.uint8)
    assert world.edit_correct(source, noisy, target)


@pytest.mark.parametrize("flaw", ["wrong_object", "wrong_colour", "unchanged", "damaged"])
def test_measure_rejects_wrong_edits(items, flaw):
  rng = np.random.default_rng(1)
  for item in items:
    source, target = world.draw(item.scene), world.draw(item.target)
    edit = world.damage(target, rng, "noise") if flaw == "damaged" else world.flawed(item, flaw, rng)
    assert not world.edit_correct(source, edit, target), (flaw, item)


def test_wrong_shapes_fail_and_half_edits_score_between(items):
  rng = np.random.default_rng(2)
  for a, b in itertools.permutations(world.SHAPES, 2):  # a shape of another kind drawn in its place
    source = world.Scene("black", ())
    target, edit = (world.Scene("black", (world.Shape(k, "red", "top left", 12),)) for k in (a, b))
    assert not world.edit_correct(world.draw(source), world.draw(edit), world.draw(target)), (a, b)
  halves = [world.edit_score(world.draw(i.scene), world.flawed(i, "partial", rng), world.draw(i.target))
            for i in items]
  assert 0.2 < np.mean(halves) < 0.7


def test_measure_names_bad_input(items):
  source, target = world.draw(items[0].scene), world.draw(items[0].target)
  with pytest.raises(ValueError, match="edit: expected a uint8"):
    world.edit_score(source, target.astype(np.float32), target)
  with pytest.raises(ValueError, match="nothing to measure"):
    world.edit_score(source, source, source)


def test_split_keeps_test_combinations_out_of_training():
  train, test = world.make_items(384, "train"), world.make_items(64, "test")
  assert not {i.combination for i in train} & {i.combination for i in test}
  assert {i.edit.kind for i in test} == set(world.KINDS)
  assert all(world.held_out(i.combination, 0) for i in test)


def test_shipped_dataset_reads_and_matches_the_world():
  records = {split: data_folder.read_records(world.WORLD_DATA, split) for split in ("train", "test")}
  assert len(records["train"]) >= 256 and len(records["test"]) == 64
  expected = world.make_items(len(records["test"]), "test")
  assert [r.prompt for r in records["test"]] == [i.prompt for i in expected]
  targets = world.targets_for(records["test"])
  for record, item, target in zip(records["test"], expected, targets):
    assert np.array_equal(target, world.draw(item.target))
    assert record.category == item.edit.kind and record.requirement == item.requirement
  with open(f"{world.WORLD_DATA}/train_metadata.jsonl") as f:
    relative = json.loads(f.readline())
  assert np.array_equal(world.targets_for([relative], world.WORLD_DATA)[0], world.targets_for(records["train"][:1])[0])
