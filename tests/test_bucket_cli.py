"""The command lines with gs:// URLs (the storage emulator of gcs_fixtures): bad bucket input is one short line
naming the flag, before any model loads; the tokenizers a pipeline folder in a bucket gives equal the local ones."""

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from editr1_jax import paths, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_BUCKET = "bucket 'no-such-bucket' does not exist"
S3 = "URL scheme s3:// is not supported"


def launch(script: str, flags: dict, cwd: str) -> subprocess.CompletedProcess:
  """launch/<script> in a fresh interpreter (the emulator's variables inherited), on the CPU."""
  argv = [f"{k}={v}" for k, v in flags.items()]
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *argv], cwd=cwd, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.fixture(scope="module")
def inputs(gcs, tmp_path_factory):
  """A judge folder and an image in the bucket, and a local folder to run in (nothing may appear there)."""
  local = tmp_path_factory.mktemp("local")
  Image.new("RGB", (16, 16), (200, 30, 30)).save(local / "ok.png")
  return {"judge": gcs.upload(os.path.join(tiny.ASSETS, "judge")), "image": gcs.upload(str(local)) + "/ok.png",
          "missing": gcs.url("none"), "cwd": str(tmp_path_factory.mktemp("cwd"))}


CASES = {  # script: (its valid flags, [(flag, bad value, the error's start)])
    "edit.py": ({"--model": "{judge}", "--image": "{image}", "--instruction": "make it blue", "--out": "{missing}.png"},
                [("--model", "gs://no-such-bucket/model", f"error: --model gs://no-such-bucket/model: {NO_BUCKET}"),
                 ("--out", "s3://b/out.png", f"error: --out s3://b/out.png: {S3}"),
                 ("--model", "{missing}", "error: --model: {missing} is not a folder")]),
    "score.py": ({"--model": "{judge}", "--source": "{image}", "--edited": "{image}", "--instruction": "make it blue"},
                 [("--template_file", "{missing}.txt", "error: --template_file: {missing}.txt not found"),
                  ("--edited", "{missing}.png", "error: --edited: {missing}.png: image not found"),
                  ("--source", "gs://no-such-bucket/a.png",
                   f"error: --source gs://no-such-bucket/a.png: {NO_BUCKET}")]),
    "ask.py": ({"--model": "{judge}", "--image": "{image}", "--prompt": "what is it?"},
               [("--image", "s3://b/a.png", f"error: --image s3://b/a.png: {S3}"),
                ("--model", "{missing}", "error: --model: {missing} is not a folder")]),
    "evaluate.py": ({"--benchmark": "imgedit", "--data": "{judge}", "--edits": "{judge}", "--judge": "{judge}",
                     "--out": "{missing}"},
                    [("--data", "{missing}", "error: --data: {missing} is not a folder"),
                     ("--out", "gs://no-such-bucket/out", f"error: --out gs://no-such-bucket/out: {NO_BUCKET}"),
                     ("--judge", "s3://b/judge", f"error: --judge s3://b/judge: {S3}")]),
}


@pytest.mark.parametrize("script,case", [(s, i) for s, (_, cases) in CASES.items() for i in range(len(cases))])
def test_bad_bucket_input_is_one_line_naming_the_flag(inputs, script, case):
  """A missing bucket, a missing object, an unsupported scheme: one line on stderr, nothing on stdout, nothing
  written here or in the bucket."""
  good, cases = CASES[script]
  flag, value, error = cases[case]
  flags = {k: v.format(**inputs) for k, v in {**good, flag: value}.items()}
  out = launch(script, flags, inputs["cwd"])
  lines = out.stderr.strip().splitlines()
  assert out.returncode != 0 and out.stdout == "" and len(lines) == 1, out.stderr[-2000:]
  assert lines[0].startswith(error.format(**inputs)), lines
  assert not os.listdir(inputs["cwd"])
  assert not any(paths.exists(inputs["missing"] + ext) for ext in ("", ".png", ".txt"))


def test_pipeline_tokenizers_from_a_bucket_equal_the_local_ones(gcs, tmp_path, monkeypatch):
  """CLIP / T5 (tokenizer/, tokenizer_2/) and Qwen2 (processor/) tokenizers of a pipeline folder in a bucket: read
  from a local copy under $EDITR1_CACHE (weights never copied), encoding as the local folder's do."""
  from editr1_jax import conditioning
  from editr1_jax import qwen_image_conditioning as qic
  monkeypatch.setenv("EDITR1_CACHE", str(tmp_path / "cache"))
  local = tmp_path / "pipeline"
  for sub in ("tokenizer", "tokenizer_2"):
    shutil.copytree(os.path.join(tiny.ASSETS, sub), local / sub)
  shutil.copytree(os.path.join(tiny.ASSETS, "judge"), local / "processor")
  (local / "transformer").mkdir()
  (local / "transformer" / "model.safetensors").write_bytes(b"\0" * 64)
  url = gcs.upload(str(local))
  texts = ["a red square on a blue background", "turn the cat into a fox 🦊"]
  for remote, here in zip(conditioning.load_tokenizers(url), conditioning.load_tokenizers(str(local))):
    assert [remote(t)["input_ids"] for t in texts] == [here(t)["input_ids"] for t in texts]
  remote, here = qic.load_tokenizer(url), qic.load_tokenizer(str(local))
  assert [remote(t)["input_ids"] for t in texts] == [here(t)["input_ids"] for t in texts]
  copied = sorted(paths.walk_files(tmp_path / "cache"))
  assert len(copied) == 8 and not any(f.endswith(".safetensors") for f in copied)  # 2 + 2 + 4 small files

