"""The command lines with gs:// URLs (the storage emulator of gcs_fixtures): bad bucket input is one short line
naming the flag, before any model loads; the tokenizers a pipeline folder in a bucket gives equal the local ones."""

import io
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
                     ("--judge", "s3://b/judge", f"error: --judge s3://b/judge: {S3}"),
                     ("--items", "{missing}.json", "error: --items: {missing}.json is not a file"),
                     ("--compare", "{missing}", "error: --compare: {missing} not found")]),
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
  copied = sorted(f for f in paths.walk_files(tmp_path / "cache") if not f.endswith(".versions.json"))
  assert len(copied) == 8 and not any(f.endswith(".safetensors") for f in copied)  # 2 + 2 + 4 small files


# ------------------------------------------------------------------------------------- end to end in the bucket
DEMO = os.path.join(os.path.dirname(tiny.ASSETS), "demo")


@pytest.fixture(scope="module")
def demo(gcs, tmp_path_factory):
  """The demo's judge and editor folders, two images and the judging prompt: here and in the bucket."""
  local = tmp_path_factory.mktemp("demo_inputs")
  Image.new("RGB", (32, 24), (200, 30, 30)).save(local / "source.png")
  Image.new("RGB", (32, 24), (30, 30, 200)).save(local / "edited.png")
  shutil.copy(os.path.join(DEMO, "judge_prompt.txt"), local / "judge_prompt.txt")
  here = {"judge": os.path.join(DEMO, "judge"), "editor": os.path.join(DEMO, "editor"), "inputs": str(local)}
  return here, {name: gcs.upload(folder) for name, folder in here.items()}


def _cli_json(script, flags, where):
  out = launch(script, {k: v.format(**where) for k, v in flags.items()}, ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_score_and_ask_read_everything_from_the_bucket(demo):
  """launch/score.py and launch/ask.py on a judge folder, images and a prompt file in the bucket print exactly what
  they print on the local copies."""
  here, there = demo
  score = {"--model": "{judge}", "--source": "{inputs}/source.png", "--edited": "{inputs}/edited.png",
           "--template_file": "{inputs}/judge_prompt.txt", "--instruction": "make it blue", "--json": "true"}
  assert _cli_json("score.py", score, there) == _cli_json("score.py", score, here)
  ask = {"--model": "{judge}", "--image": "{inputs}/source.png", "--prompt": "what colour is it?",
         "--max_new_tokens": "3", "--json": "true"}
  assert _cli_json("ask.py", ask, there) == _cli_json("ask.py", ask, here)


def test_edit_and_evaluate_write_into_the_bucket(demo, gcs, tmp_path):
  """launch/edit.py writes its edit to a gs:// --out; launch/evaluate.py judges --edits in the bucket against a
  release in the bucket and writes OUT there (nothing local)."""
  from editr1_jax.bench import mini, run
  here, there = demo
  out = gcs.url("edited.png")
  _cli_json("edit.py", {"--model": there["editor"], "--image": there["inputs"] + "/source.png",
                        "--instruction": "make it blue", "--out": out, "--steps": "1", "--dtype": "float32",
                        "--auto_resize": "false"}, {})
  with Image.open(io.BytesIO(paths.read_bytes(out))) as image:
    assert image.format == "PNG" and image.size == (32, 16)
  bench = mini.write(tmp_path / "mini", per_category=1)
  task = run.make_task("imgedit", bench.imgedit)
  edits = gcs.url("edits")
  run.sample_edits(task, lambda sources, *_: [s for s in sources], edits)
  result = gcs.url("eval")
  printed = _cli_json("evaluate.py", {"--benchmark": "imgedit", "--data": gcs.upload(bench.imgedit),
                                      "--edits": edits, "--judge": there["judge"], "--out": result,
                                      "--max_new_tokens": "2", "--batch_size": "9", "--dtype": "float32"}, {})
  assert printed.startswith("# imgedit")
  assert printed.strip() == paths.read_text(paths.join(result, "summary.md")).strip()
  assert len(paths.read_text(paths.join(result, run.RESULTS)).splitlines()) == len(task.items)
  assert len(paths.walk_files(paths.join(result, run.EDITS))) == len(task.items)
  assert paths.listdir(paths.join(result, run.GALLERY))

