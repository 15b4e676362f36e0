"""The training program with everything in a bucket (the storage emulator of gcs_fixtures): the demo's models,
data and judging prompt read from gs://, the workdir there, a resume from the bucket, the export written there.
Nothing is created in the working directory, and the run equals the same run on local folders."""

import os
import subprocess
import sys

import numpy as np
import pytest

from editr1_jax import paths
from editr1_jax import weights as wio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "editr1_jax", "assets", "demo")
WORLD = os.path.join(ROOT, "editr1_jax", "data", "world")
SHORT = [f"--config={ROOT}/configs/demo.py", "--config.num_epochs=2", "--config.eval_every=0", "--config.checkpoint_every=1",
         "--config.data.groups_per_epoch=2", "--config.log_images_every=1"]


def _run(script: str, flags: list, cwd, cache, *, own_compile_cache: bool = False) -> subprocess.CompletedProcess:
  """`own_compile_cache`: the run's default one, <workdir>/compile_cache, instead of the test session's."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", EDITR1_CACHE=str(cache))
  if own_compile_cache:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *flags], cwd=str(cwd), env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _lora(path: str) -> dict:
  reader = wio.SafetensorsReader([path])
  return {name: np.asarray(reader.read(name)) for name in reader.names()}


@pytest.fixture(scope="module")
def bucket_run(gcs, tmp_path_factory):
  models, world = gcs.upload(DEMO, "demo"), gcs.upload(WORLD, "world")
  workdir = gcs.url("run")
  flags = SHORT + [f"--workdir={workdir}", f"--config.model.pipeline_dir={models}/editor",
                   f"--config.reward.model_dir={models}/judge",
                   f"--config.reward.template_file={models}/judge_prompt.txt", f"--config.data.dataset_dir={world}"]
  cwd = tmp_path_factory.mktemp("cwd")
  first = _run("train.py", flags + ["--stop_after=1"], cwd, tmp_path_factory.mktemp("host_a"), own_compile_cache=True)
  # a second host with an empty local cache resumes from the bucket
  second = _run("train.py", flags, cwd, tmp_path_factory.mktemp("host_b"), own_compile_cache=True)
  export = _run("export.py", [f"--workdir={workdir}", f"--out={workdir}/export", "--weights=current"], cwd,
                tmp_path_factory.mktemp("host_c"))
  return workdir, cwd, first, second, export


def test_everything_in_the_bucket(bucket_run):
  workdir, cwd, first, second, export = bucket_run
  assert os.listdir(cwd) == []  # no local folder named after a URL, nothing else either
  assert "epoch 1/2 |" in first.stdout and "epoch 2/2 |" not in first.stdout
  assert "resumed from" in second.stdout and "at epoch 1" in second.stdout and "epoch 2/2 |" in second.stdout
  files = paths.walk_files(workdir)
  for expected in ("checkpoints/1/editr1_manifest.json", "checkpoints/2/editr1_manifest.json", "tfds/source.json",
                   "images/rollouts_00002.png", "export/pytorch_lora_weights.safetensors"):
    assert expected in files, expected
  assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
  assert any(f.startswith("compile_cache/") for f in files)  # config.compile_cache_dir defaults into the workdir
  assert export.stdout.strip() == f"{workdir}/export/pytorch_lora_weights.safetensors"


def test_the_bucket_run_equals_the_local_run(bucket_run, tmp_path):
  workdir = bucket_run[0]
  local = tmp_path / "run"
  _run("train.py", SHORT + [f"--workdir={local}"], tmp_path, tmp_path / "cache")
  _run("export.py", [f"--workdir={local}", f"--out={local}/export", "--weights=current"], tmp_path,
       tmp_path / "cache")
  ours, theirs = _lora(f"{workdir}/export/pytorch_lora_weights.safetensors"), _lora(
      str(local / "export" / "pytorch_lora_weights.safetensors"))
  assert ours.keys() == theirs.keys() and any(np.abs(v).max() > 0 for k, v in ours.items() if "lora_B" in k)
  for name in ours:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
