"""Dataset folder validation, the tfds array_record builder (no TensorFlow), the grouped sampler."""

import os
import shutil
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from editr1_jax.data import builder, fingerprint, folder, sampler

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
  with pytest.raises(folder.DatasetError, match=r"train_metadata.jsonl:5: .*train_004.png: unreadable image") as e:
    folder.read_records(str(dataset), "train")
  assert e.value.__cause__ is None and e.value.__suppress_context__  # one line, not three chained tracebacks


def test_empty_image_is_one_short_line_before_the_build(dataset, tmp_path):
  """A zero-byte image is named (metadata file and line, the image) by the start-up's cheap pass, the fingerprint,
  before anything is decoded or built; and by a build. No chained traceback under it."""
  image = dataset / "images" / "train_005.png"
  image.write_bytes(b"")
  expect = f"{dataset / folder.SPLITS['train']}:6: {image}: image is empty (0 bytes)"
  for call in (lambda: builder.fingerprint(str(dataset), str(tmp_path / "tfds")),
               lambda: builder.prepare(str(dataset), str(tmp_path / "tfds")),
               lambda: folder.read_records(str(dataset), "train")):
    with pytest.raises(folder.DatasetError) as e:
      call()
    assert str(e.value) == expect and e.value.__cause__ is None and "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "tfds" / "edit_r1")


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


def test_copy_is_rebuilt_when_the_folder_or_its_contents_change(dataset, tmp_path):
  """A workdir's copy is reused only for the same folder with the same bytes (metadata and every image)."""
  tfds_dir = str(tmp_path / "tfds")
  first = builder.Split(builder.prepare(str(dataset), tfds_dir), "train")
  before = np.asarray(first[3]["image"])
  copy_file = next(os.path.join(d, f) for d, _, fs in os.walk(tfds_dir) for f in fs if "array_record" in f)
  stamp = os.stat(copy_file).st_mtime_ns
  builder.prepare(str(dataset), tfds_dir)
  assert os.stat(copy_file).st_mtime_ns == stamp  # unchanged: reused
  Image.new("RGB", (64, 64), (9, 200, 30)).save(dataset / "images" / "train_003.png")
  after = builder.Split(builder.prepare(str(dataset), tfds_dir), "train")[3]["image"]
  assert np.asarray(after)[0, 0].tolist() == [9, 200, 30] and not np.array_equal(before, np.asarray(after))
  _write_line(dataset, "train", 1, '{"prompt": "Turn it blue.", "image": "images/train_000.png", '
                                   '"requirement": "Only the colour changes."}')
  assert builder.Split(builder.prepare(str(dataset), tfds_dir), "train")[0]["prompt"] == "Turn it blue."
  other = tmp_path / "other"
  shutil.copytree(DEMO, other)
  assert builder.Split(builder.prepare(str(other), tfds_dir), "train")[0]["prompt"] != "Turn it blue."


def test_fingerprint_names_what_changed(dataset, tmp_path):
  old = builder.fingerprint(str(dataset), str(tmp_path / "cache"))
  moved = tmp_path / "moved"
  shutil.copytree(dataset, moved)
  same = builder.fingerprint(str(moved), str(tmp_path / "cache"))
  assert same.digest == old.digest  # the content, not the path, is what a checkpoint was trained on
  assert fingerprint.differences(old, same) == [f"dataset folder: was {dataset}, now {moved}"]
  Image.new("RGB", (64, 64)).save(moved / "images" / "train_002.png")
  os.remove(moved / "images" / "test_000.png")
  _write_line(moved, "test", 1, '{"prompt": "x", "image": "images/test_001.png", "requirement": "r"}')
  new = builder.fingerprint(str(moved), str(tmp_path / "cache"))
  assert fingerprint.differences(old, new)[1:] == [
      "2 file(s) changed: images/train_002.png, test_metadata.jsonl", "1 file(s) removed: images/test_000.png"]


# --------------------------------------------------------------------------------------------------
def test_metadata_that_is_not_utf8_is_named(dataset):
  path = dataset / folder.SPLITS["train"]
  lines = path.read_bytes().splitlines(keepends=True)
  lines[3] = lines[3][:12] + b"\xe4" + lines[3][13:]  # a Latin-1 byte in the instruction, not UTF-8
  path.write_bytes(b"".join(lines))
  with pytest.raises(folder.DatasetError, match=rf"^{path}:4: not UTF-8 \(byte 0xe4 at column 13\)$"):
    folder.read_records(str(dataset), "train")


@pytest.mark.parametrize("key", ["prompt", "requirement", "category", "image"])
def test_lone_surrogates_are_named(dataset, key):
  fields = {"prompt": "x", "image": "images/train_000.png", "requirement": "r", "category": "c"}
  fields[key] = "\\ud800" if key != "image" else "images/train_000\\ud800.png"
  path = _write_line(dataset, "train", 2, "{" + ", ".join(f'"{k}": "{v}"' for k, v in fields.items()) + "}")
  with pytest.raises(folder.DatasetError, match=rf"^{path}:2: field '{key}' holds an unpaired surrogate"):
    folder.read_records(str(dataset), "train")


def test_image_paths_outside_the_folder_need_permission(dataset, tmp_path):
  shutil.copy(dataset / "images" / "train_000.png", tmp_path / "outside.png")
  for image in ("../outside.png", str(tmp_path / "outside.png"), "images/../../outside.png"):
    path = _write_line(dataset, "train", 2, f'{{"prompt": "x", "image": "{image}", "requirement": "r"}}')
    with pytest.raises(folder.DatasetError, match=rf"^{path}:2: field 'image' '{image}' leaves the dataset folder"):
      folder.read_records(str(dataset), "train")
    assert folder.read_records(str(dataset), "train", allow_outside=True)[1].image_path == str(tmp_path / "outside.png")
  with pytest.raises(folder.DatasetError, match="leaves the dataset folder"):
    builder.prepare(str(dataset), str(tmp_path / "tfds"))
  split = builder.Split(builder.prepare(str(dataset), str(tmp_path / "tfds"), allow_outside=True), "train")
  np.testing.assert_array_equal(np.asarray(split[1]["image"]), np.asarray(Image.open(tmp_path / "outside.png")))


def test_16_bit_images_reach_training_as_8_bit(dataset, tmp_path):
  values = np.full((64, 64), 32768, np.uint16)
  values[:, :32] = 257 * 40
  Image.fromarray(values).save(dataset / "images" / "train_000.png")  # mode I;16
  split = builder.Split(builder.prepare(str(dataset), str(tmp_path / "tfds")), "train")
  image = np.asarray(split[0]["image"])
  assert split[0]["image"].mode == "RGB"
  np.testing.assert_array_equal(image[:, :32], 40)
  np.testing.assert_array_equal(image[:, 32:], 128)


def test_build_leaves_nothing_in_the_temp_dir(dataset, tmp_path, monkeypatch):
  temp = tmp_path / "system_tmp"
  temp.mkdir()
  monkeypatch.setenv("TMPDIR", str(temp))
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  builder.prepare(str(dataset), str(tmp_path / "tfds"))
  assert os.listdir(temp) == []
