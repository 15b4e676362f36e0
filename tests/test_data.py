"""Dataset folder validation, the tfds array_record builder (no TensorFlow), the grouped sampler."""

import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from editr1_jax.data import builder, folder, sampler

DEMO = os.path.join(os.path.dirname(folder.__file__), "demo")


@pytest.fixture()
def dataset(tmp_path):
  dst = tmp_path / "ds"
  shutil.copytree(DEMO, dst)
  return dst


def _write_line(ds, split, lineno, text):
  path = ds / folder.SPLITS[split]
  lines = path.read_text().splitlines()
  lines[lineno - 1] = text
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_demo_dataset_is_small_and_valid():
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DEMO) for f in fs)
  assert size < 1_000_000
  train = folder.read_records(DEMO, "train")
  assert len(train) >= 24 and len(folder.read_records(DEMO, "test")) >= 4
  assert [r.id for r in train] == list(range(len(train)))


@pytest.mark.parametrize("bad,expect", [
    ("{not json", "malformed JSON"),
    ('{"prompt": "x", "image": "images/train_000.png"}', "missing field(s) ['requirement']"),
    ('{"prompt": "  ", "image": "images/train_000.png", "requirement": "r"}', "empty instruction"),
    ('{"prompt": "x", "image": "images/nope.png", "requirement": "r"}', "not found"),
    ('{"prompt": 3, "image": "images/train_000.png", "requirement": "r"}', "field 'prompt' must be a string"),
    ('{"prompt": "x", "image": "images/train_000.png", "requirement": "r", "extra": "1"}', "unknown field(s) ['extra']"),
])
def test_bad_lines_name_file_and_line(dataset, bad, expect):
  path = _write_line(dataset, "train", 3, bad)
  with pytest.raises(folder.DatasetError) as e:
    folder.read_records(str(dataset), "train")
  assert f"{path}:3:" in str(e.value) and expect in str(e.value)


def test_unreadable_image_is_named(dataset):
  (dataset / "images" / "train_004.png").write_bytes(b"not a png")
  with pytest.raises(folder.DatasetError, match=r"train_metadata.jsonl:5: image .*train_004.png is unreadable"):
    folder.read_records(str(dataset), "train")


def test_builder_round_trip_without_tensorflow(dataset, tmp_path):
  b = builder.prepare(str(dataset), str(tmp_path / "tfds"))
  assert "tensorflow" not in sys.modules
  split = builder.Split(b, "train")
  records = folder.read_records(str(dataset), "train")
  assert len(split) == len(records)
  for rid in (0, 7, len(records) - 1):
    ex = split[rid]
    r = records[rid]
    assert (ex["id"], ex["prompt"], ex["requirement"], ex["category"]) == (r.id, r.prompt, r.requirement, r.category)
    np.testing.assert_array_equal(np.asarray(ex["image"]), np.asarray(Image.open(r.image_path).convert("RGB")))
  assert len(builder.Split(b, "test")) == len(folder.read_records(str(dataset), "test"))
  ids = [5, 0, 5, 3]
  read = builder.read(split, ids, num_threads=3)
  assert [r["id"] for r in read] == ids
  np.testing.assert_array_equal(np.asarray(read[0]["image"]), np.asarray(split[5]["image"]))


def test_builder_refuses_invalid_folder(dataset, tmp_path):
  _write_line(dataset, "test", 2, "{broken")
  with pytest.raises(folder.DatasetError, match="test_metadata.jsonl:2: malformed JSON"):
    builder.prepare(str(dataset), str(tmp_path / "tfds"))


def test_sampler_is_deterministic_and_host_independent():
  s = sampler.GroupedSampler(num_records=40, groups_per_epoch=6, group_size=4, seed=3)
  whole = s.rollouts(epoch=2)
  assert len(whole) == 24 and len(set(whole)) == 6
  assert all((whole[i * 4:(i + 1) * 4] == whole[i * 4]).all() for i in range(6))
  np.testing.assert_array_equal(whole, sampler.GroupedSampler(40, 6, 4, seed=3).rollouts(epoch=2))
  assert not np.array_equal(whole, s.rollouts(epoch=3))
  shares = [s.rollouts(epoch=2, process_index=p, process_count=4) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(shares), whole)
  with pytest.raises(ValueError, match="do not divide over 5 hosts"):
    s.rollouts(epoch=2, process_count=5)


def test_sampler_banning_and_state():
  s = sampler.GroupedSampler(num_records=10, groups_per_epoch=4, group_size=2, seed=0)
  s.ban(s.epoch_records(0))
  assert not set(s.epoch_records(1)) & s.banned
  restored = sampler.GroupedSampler(10, 4, 2, seed=0)
  restored.restore(s.state())
  np.testing.assert_array_equal(restored.rollouts(5), s.rollouts(5))
  s.ban(range(8))
  with pytest.raises(ValueError, match="2 records left after banning 8"):
    s.epoch_records(6)
