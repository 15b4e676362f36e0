"""launch/tpu_pod.sh without a TPU: `gcloud` is a stub on PATH that records its arguments and plays one TPU host (a
temporary home folder): `tpu-vm scp` copies the file there, `tpu-vm ssh --command=C` runs `bash -c C` there, with a
venv whose `pip` and `python` are stubs that record how they were called."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.sh")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or subprocess.run(["git", "-C", ROOT, "rev-parse"], capture_output=True).returncode,
    reason="needs bash and a git checkout")

GCLOUD = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
host = os.environ["FAKE_HOST"]
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  shutil.copy(args[4], os.path.join(host, args[5].split(":", 1)[1]))
  shutil.copy(args[4], os.path.join(host, "copied.tar.gz"))  # the script deletes its tarball, the host its copy
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  command = [a for a in args if a.startswith("--command=")][0].split("=", 1)[1]
  env = {{k: v for k, v in os.environ.items() if k in ("PATH", "TRAIN_RC")}}  # a fresh login: nothing else of ours
  sys.exit(subprocess.run(["bash", "-c", command], env=dict(env, HOME=host)).returncode)
"""
# The host's venv: records the folder it ran in, $EDITR1_CACHE and its arguments (NUL-separated); python exits with $TRAIN_RC.
RECORDER = """#!/usr/bin/env bash
{ printf '%s\\0' "$PWD" "${EDITR1_CACHE-unset}" "$@"; } > "$HOME/$(basename "$0").args"
if [ "$(basename "$0")" = python ]; then exit "${TRAIN_RC:-0}"; fi
"""

ARGS = [
    "--config=configs/kontext.py",
    "--workdir=gs://my-bucket/runs/kontext a",
    "--config.model.pipeline_dir=gs://my-bucket/models/FLUX.1-Kontext-dev",
    "--config.reward.model_dir=gs://my-bucket/models/Qwen2.5-VL-32B-Instruct",
    "--config.data.dataset_dir=gs://my-bucket/data/edit_r1",
    "--config.reward.template_file=gs://my-bucket/prompts/judge $HOME's \"v2\"; *.txt",
    "--config.rollout.num_steps=8",
    "--config.a=$(touch pwned)",  # never run by the remote shell
]


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)


@pytest.fixture
def pod(tmp_path):
  """(run(args, **env) -> CompletedProcess, the fake host's home, the gcloud log's calls)."""
  bin_dir, host = tmp_path / "bin", tmp_path / "host"
  (host / "editr1_jax.venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  _write(bin_dir / "gcloud", GCLOUD)
  for name in ("python", "pip"):
    _write(host / "editr1_jax.venv" / "bin" / name, RECORDER)
  (host / "editr1_jax").mkdir()
  (host / "editr1_jax" / "stale.py").write_text("")  # a file of an older copy: gone after the new one arrives
  log = tmp_path / "gcloud.log"

  def run(args, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT", "PYTHON")}
    env = dict(base, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GCLOUD_LOG=str(log), FAKE_HOST=str(host),
               TMPDIR=str(tmp_path), **env)
    return subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True, timeout=60)

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

  return run, host, calls


def _recorded(path):
  return path.read_bytes().decode().split("\0")[:-1]


def test_refuses_without_tpu_name_or_workdir(pod):
  run, _, calls = pod
  result = run(ARGS, ZONE="us-central2-b")
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1 and "TPU_NAME" in result.stderr and "ZONE" not in result.stderr.split("(")[0]
  result = run(["--config=configs/kontext.py"], TPU_NAME="my-tpu", ZONE="us-central2-b")
  assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--workdir" in result.stderr
  assert calls() == []


def test_copies_the_checkout_installs_and_runs_train_with_the_arguments_unchanged(pod, tmp_path):
  run, host, calls = pod
  result = run(ARGS, TPU_NAME="my-tpu", ZONE="us-central2-b", PROJECT="my-project", EDITR1_CACHE="/mnt/disks/cache x")
  assert result.returncode == 0, result.stderr
  scp, setup, train = calls()
  for call in (scp, setup, train):
    assert "--worker=all" in call and "--zone=us-central2-b" in call and "--project=my-project" in call
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5] == "my-tpu:editr1_jax.tar.gz"
  assert setup[:5] == train[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]

  # The work tree's files (tracked and untracked-but-not-ignored), nothing ignored, unpacked in place of the old copy.
  with tarfile.open(host / "copied.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"launch/train.py", "launch/tpu_pod.sh", "requirements.txt", "tests/test_launch_scripts.py"} <= names
  assert not any(n.startswith(".venv/") or "__pycache__" in n for n in names)
  assert (host / "editr1_jax" / "launch" / "train.py").is_file() and not (host / "editr1_jax" / "stale.py").exists()
  assert not (host / "editr1_jax.tar.gz").exists() and not list(tmp_path.glob("editr1_jax.*"))

  jax_version = [line for line in open(os.path.join(ROOT, "requirements.txt")) if line.startswith("jax==")][0]
  pip = _recorded(host / "pip.args")
  assert pip[:2] == [str(host / "editr1_jax"), "unset"] and pip[2:] == [
      "install", "-q", "-r", "requirements.txt", "-e", ".", "jax[tpu]==" + jax_version.split("==")[1].split()[0]]
  python = _recorded(host / "python.args")
  assert python == [str(host / "editr1_jax"), "/mnt/disks/cache x", "launch/train.py", "--distributed", *ARGS]


def test_the_exit_status_is_the_hosts_and_an_old_python_is_refused(pod):
  run, host, calls = pod
  result = run(ARGS, TPU_NAME="my-tpu", ZONE="us-central2-b", TRAIN_RC="3")
  assert result.returncode == 3 and len(calls()) == 3

  shutil.rmtree(host / "editr1_jax.venv")  # a fresh host: the venv is created with $PYTHON, which must be 3.11+
  old = host / "python3.9"
  _write(old, "#!/usr/bin/env bash\nexit 1\n")
  result = run(ARGS, TPU_NAME="my-tpu", ZONE="us-central2-b", PYTHON=str(old))
  assert result.returncode == 1 and "is not Python 3.11+ (set PYTHON)" in result.stderr
  assert len(calls()) == 5  # no third ssh: train.py never started
