"""editr1_jax.paths: the same operations on a local folder and in a bucket (the storage emulator)."""

import os
import subprocess
import sys

import pytest

from editr1_jax import paths


@pytest.fixture(params=["local", "bucket"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs").url("root")


def test_files_and_folders(root):
  paths.makedirs(paths.join(root, "a"))
  paths.write_text(paths.join(root, "a", "x.txt"), "hello")
  paths.write_bytes(paths.join(root, "a", "b", "y.bin"), bytes(range(10)))
  assert paths.isdir(paths.join(root, "a")) and paths.isfile(paths.join(root, "a", "x.txt"))
  assert not paths.exists(paths.join(root, "a", "z.txt")) and not paths.isfile(paths.join(root, "a"))
  assert paths.read_text(paths.join(root, "a", "x.txt")) == "hello"
  assert paths.getsize(paths.join(root, "a", "b", "y.bin")) == 10
  assert paths.read_ranges(paths.join(root, "a", "b", "y.bin"), [2, 7], [4, 10]) == [b"\x02\x03", b"\x07\x08\x09"]
  assert paths.listdir(paths.join(root, "a")) == ["b", "x.txt"]
  assert paths.walk_files(root) == ["a/b/y.bin", "a/x.txt"]
  paths.append_text(paths.join(root, "a", "x.txt"), " world")
  assert paths.read_text(paths.join(root, "a", "x.txt")) == "hello world"
  paths.rename(paths.join(root, "a"), paths.join(root, "c"))
  assert paths.walk_files(root) == ["c/b/y.bin", "c/x.txt"]
  with paths.open(paths.join(root, "c", "x.txt")) as f:
    assert f.read() == "hello world"
  paths.rmtree(paths.join(root, "c"))
  assert not paths.exists(paths.join(root, "c", "x.txt"))


def test_url_text_operations():
  assert paths.normpath("gs://b/x/../y/") == "gs://b/y"
  assert paths.relpath("gs://b/x/y/z.png", "gs://b/x") == "y/z.png"
  assert paths.is_inside("gs://b/x/y", "gs://b/x") and not paths.is_inside("gs://b/xy", "gs://b/x")
  assert paths.dirname("gs://b/x/y.txt") == "gs://b/x" and paths.basename("gs://b/x/y.txt") == "y.txt"
  with pytest.raises(paths.PathError, match="s3:// is not supported"):
    paths.check_input("s3://b/x", "config.data.dataset_dir")


def test_bucket_errors(gcs):
  with pytest.raises(paths.PathError, match="^--workdir gs://no-such-bucket/run: bucket 'no-such-bucket' does not exist"):
    paths.check_output("gs://no-such-bucket/run", "--workdir")
  with pytest.raises(paths.PathError, match="config.model.pipeline_dir gs://editr1-test/.*: folder not found"):
    paths.check_input(gcs.url("nothing"), "config.model.pipeline_dir")
  with pytest.raises(paths.PathError, match="file not found"):
    paths.check_input(gcs.url("x.txt"), "config.reward.template_file", kind="file")


def test_no_credentials_is_one_short_error(tmp_path):
  """Without the emulator and without credentials: one line saying how to provide them, before any request."""
  env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
  env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), GCE_METADATA_HOST="127.0.0.1:9",
             GCE_METADATA_IP="127.0.0.1:9")
  code = ("from editr1_jax import paths\n"
          "try:\n  paths.check_input('gs://some-bucket/data', 'config.data.dataset_dir')\n"
          "except paths.PathError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("gs://some-bucket/data: no Google Cloud credentials found"), out.stdout
  assert "gcloud auth application-default login" in out.stdout and "GOOGLE_APPLICATION_CREDENTIALS" in out.stdout


def test_local_copy(gcs, tmp_path, monkeypatch):
  monkeypatch.setenv("EDITR1_CACHE", str(tmp_path / "cache"))
  url = gcs.url("tok")
  paths.write_text(paths.join(url, "tokenizer.json"), "{}")
  paths.write_text(paths.join(url, "sub", "vocab.txt"), "a b")
  paths.write_bytes(paths.join(url, "model.safetensors"), b"0" * 100)
  local = paths.local_copy(url)
  assert paths.walk_files(local) == ["sub/vocab.txt", "tokenizer.json"]
  assert open(os.path.join(local, "sub", "vocab.txt")).read() == "a b"
  paths.write_text(paths.join(url, "sub", "vocab.txt"), "c d")  # same size, new object: copied again
  paths.remove(paths.join(url, "tokenizer.json"))  # deleted there: deleted here
  assert paths.local_copy(url) == local and open(os.path.join(local, "sub", "vocab.txt")).read() == "c d"
  assert not os.path.exists(os.path.join(local, "tokenizer.json"))
  assert paths.local_copy(str(tmp_path)) == str(tmp_path)
