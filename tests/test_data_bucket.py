"""A dataset folder and a workdir's tfds copy in a bucket (the storage emulator of `gcs_fixtures`)."""

import json
import os

import numpy as np
import pytest

from editr1_jax import paths
from editr1_jax.data import builder, fingerprint, folder, make_demo

DEMO = os.path.join(os.path.dirname(folder.__file__), "demo")


@pytest.fixture(scope="module")
def demo_url(gcs):
  """The shipped demo folder, uploaded once (the tests below only read it)."""
  return gcs.upload(DEMO, "demo")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
  """A fresh local cache (`paths.cache_root`), and a working directory where a stray `gs:` folder would show."""
  monkeypatch.setenv("EDITR1_CACHE", str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  yield tmp_path / "cache"
  assert not os.path.exists(tmp_path / "gs:")  # nothing is ever created locally for a URL


def _fields(records):
  return [(r.id, r.prompt, r.requirement, r.category, os.path.relpath(r.image_path, DEMO)) for r in records]


def test_records_of_a_folder_in_a_bucket(demo_url, cache):
  for split in folder.SPLITS:
    local = folder.read_records(DEMO, split)
    remote = folder.read_records(demo_url, split)
    assert all(r.image_path.startswith(demo_url + "/images/") for r in remote)
    assert [(r.id, r.prompt, r.requirement, r.category, paths.relpath(r.image_path, demo_url)) for r in remote] == \
        _fields(local)
    assert folder.read_records(demo_url, split, decode_images=False) == remote


def test_image_paths_leaving_a_bucket_folder_are_refused(gcs, cache):
  url = gcs.url("ds")
  paths.write_bytes(paths.join(url, "outside.png"), open(os.path.join(DEMO, "images", "train_000.png"), "rb").read())
  for image in ("../outside.png", "images/../../outside.png"):
    line = json.dumps({"prompt": "x", "image": image, "requirement": "r"})
    paths.write_text(paths.join(url, "inner", "train_metadata.jsonl"), line + "\n")
    with pytest.raises(folder.DatasetError, match=rf"^{url}/inner/train_metadata.jsonl:1: field 'image' .* leaves"):
      folder.read_records(paths.join(url, "inner"), "train")
    records = folder.read_records(paths.join(url, "inner"), "train", allow_outside=True)
    assert records[0].image_path == paths.join(url, "outside.png")
  paths.write_text(paths.join(url, "inner", "train_metadata.jsonl"),
                   json.dumps({"prompt": "x", "image": "s3://b/x.png", "requirement": "r"}) + "\n")
  with pytest.raises(folder.DatasetError, match=r"train_metadata.jsonl:1: image s3://b/x.png: URL scheme s3://"):
    folder.read_records(paths.join(url, "inner"), "train", allow_outside=True)


def test_empty_image_in_a_bucket_is_one_short_line(gcs, cache):
  url = gcs.upload(DEMO)
  paths.write_bytes(paths.join(url, "images", "test_002.png"), b"")
  for decode in (False, True):
    with pytest.raises(folder.DatasetError) as e:
      folder.read_records(url, "test", decode_images=decode)
    assert str(e.value) == f"{url}/test_metadata.jsonl:3: {url}/images/test_002.png: image is empty (0 bytes)"
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)


def test_fingerprint_of_a_bucket_copy_equals_the_local_one(gcs, cache, monkeypatch):
  """The content decides the digest, wherever it lives; the digest cache in a bucket spares a fresh host from
  re-hashing, and a rewritten object (same size) is hashed again."""
  url = gcs.upload(DEMO)
  tfds_url = gcs.url("tfds")
  local = builder.fingerprint(DEMO, str(cache / "local_tfds"))
  first = builder.fingerprint(url, tfds_url)
  assert first.digest == local.digest and first.source == url
  assert paths.isfile(paths.join(tfds_url, fingerprint.CACHE))
  hashed = []
  sha256 = paths.sha256
  monkeypatch.setattr(paths, "sha256", lambda p: hashed.append(p) or sha256(p))
  assert builder.fingerprint(url, tfds_url).digest == first.digest and hashed == []
  image = paths.join(url, "images", "train_001.png")
  data = bytearray(paths.read_bytes(image))
  data[len(data) // 2] ^= 1  # same size, new generation
  paths.write_bytes(image, bytes(data))
  changed = builder.fingerprint(url, tfds_url)
  assert image in hashed and fingerprint.differences(first, changed) == ["1 file(s) changed: images/train_001.png"]


def test_tfds_copy_in_a_bucket_is_built_once_then_downloaded(demo_url, gcs, cache, monkeypatch, tmp_path):
  """First start: built locally, uploaded, marker last. A fresh host (empty cache): downloaded, not rebuilt, and
  reads the same records as a local build. A copy without its marker (an interrupted upload) is rebuilt."""
  builds = []
  generate = builder.EditR1._split_generators  # pylint: disable=protected-access
  monkeypatch.setattr(builder.EditR1, "_split_generators", lambda self, dl: builds.append(1) or generate(self, dl))
  tfds_url = gcs.url("workdir", "tfds")
  reference = builder.prepare(DEMO, str(tmp_path / "local_tfds"))
  builds.clear()

  first = builder.prepare(demo_url, tfds_url)
  assert len(builds) == 1 and str(first.data_dir).startswith(str(cache))
  assert any(f.endswith("array_record-00000-of-00001") for f in paths.walk_files(tfds_url))
  assert paths.isfile(paths.join(tfds_url, builder.SOURCE_FILE))

  monkeypatch.setenv("EDITR1_CACHE", str(tmp_path / "fresh_cache"))
  again = builder.prepare(demo_url, tfds_url)
  assert len(builds) == 1 and str(again.data_dir).startswith(str(tmp_path / "fresh_cache"))
  for split in folder.SPLITS:
    want, got = builder.Split(reference, split), builder.Split(again, split)
    assert len(got) == len(want)
    ids = list(range(len(want)))
    for w, g in zip(builder.read(want, ids, num_threads=2), builder.read(got, ids, num_threads=2)):
      assert {k: v for k, v in g.items() if k != "image"} == {k: v for k, v in w.items() if k != "image"}
      np.testing.assert_array_equal(np.asarray(g["image"]), np.asarray(w["image"]))

  paths.remove(paths.join(tfds_url, builder.SOURCE_FILE))
  monkeypatch.setenv("EDITR1_CACHE", str(tmp_path / "third_cache"))
  builder.prepare(demo_url, tfds_url)
  assert len(builds) == 2 and paths.isfile(paths.join(tfds_url, builder.SOURCE_FILE))


def test_make_demo_writes_into_a_bucket(gcs, cache):
  url = gcs.url("drawn")
  make_demo.make(url, n_train=2, n_test=1)
  assert [len(folder.read_records(url, split)) for split in ("train", "test")] == [2, 1]
