"""`launch/train.py` as a pod runs it: two processes on localhost joined by `jax.distributed`, one CPU
device each, against one process holding both devices. Same mesh (2, 1, 1), same run."""

import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np

from editr1_jax import export
from editr1_jax import weights as wio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config=configs/tiny.py", "--config.num_epochs=1", "--config.eval_every=1",
         "--config.data.groups_per_epoch=2", "--config.data.group_size=4"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train(workdir, devices: int, extra=()):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the pair compiles the same programs at once: no shared cache
  return subprocess.Popen([sys.executable, "launch/train.py", *FLAGS, f"--workdir={workdir}", *extra], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _exported(workdir, out) -> dict:
  """The run's adapter through the export path: a pod's checkpoint read back on another topology."""
  path, = export.export_run(str(workdir), str(out), weights="current")
  reader = wio.SafetensorsReader([path])
  return {name: reader.read(name) for name in reader.names()}


def test_two_processes_train_like_one(tmp_path):
  port = _free_port()
  pair = [_train(tmp_path / "pair", 1, [f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}"])
          for i in range(2)]
  single = _train(tmp_path / "single", 2)
  outs = [p.communicate(timeout=600) for p in pair + [single]]
  for p, (out, err) in zip(pair + [single], outs):
    assert p.returncode == 0, err[-3000:]
  assert "devices: 2 cpu, processes: 2" in outs[0][0]
  assert "epoch 1/1 | reward" in outs[0][0] and "epoch 1/1" not in outs[1][0]  # host 0 reports, host 1 is quiet
  assert os.path.isdir(tmp_path / "pair" / "tfds" / "process_1")  # each host its own data copy
  pair, single = _exported(tmp_path / "pair", tmp_path / "out_pair"), _exported(tmp_path / "single", tmp_path / "out")
  assert pair.keys() == single.keys() and pair
  assert any(np.abs(v).max() > 0 for k, v in single.items() if "lora_B" in k)  # trained, not the zero init
  # same mesh, same programs: only cross-process collectives might sum in another order, and the run's one Adam step
  # moves a weight by lr * g / (|g| + 1e-8) ~ lr * sign(g), which that rounding leaves alone: ulps at most (measured 0)
  for name in single:
    np.testing.assert_allclose(pair[name], single[name], rtol=1e-6, atol=1e-7, err_msg=name)


def _pair(workdir, extra=(), per_process=((), ()), port=None):
  port = port or _free_port()
  return [_train(workdir, 1, [f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}", *extra,
                              *per_process[i]]) for i in range(2)]


def test_sigterm_to_one_host_stops_both_at_the_same_point(tmp_path):
  """SIGTERM reaches process 1 only (as on a pod where one host is preempted first): jax's preemption sync point
  stops both at the same check, each exits 0 with the finished epochs saved, and the pair resumed with the same
  command ends as an uninterrupted run. The notice travels through the coordination service asynchronously, so
  the check that stops the pair is some later one (an epoch after compiling takes ~0.6 s here: CI once stopped after
  epoch 2); six epochs leave room for that, and the test asserts the pair agreed, not on which epoch."""
  epochs = 6
  extra = [f"--config.num_epochs={epochs}", "--config.eval_every=0", "--config.checkpoint_every=100"]
  pair = _pair(tmp_path / "pair", extra)
  sent, lines = False, []
  for line in pair[0].stdout:
    lines.append(line)
    if not sent and f"epoch 1/{epochs} |" in line:
      pair[1].send_signal(signal.SIGTERM)
      sent = True
  outs = [p.communicate(timeout=600) for p in pair]
  out0 = "".join(lines) + outs[0][0]
  for p, (_, err) in zip(pair, outs):
    assert p.returncode == 0, err[-3000:]
  stopped = re.search(r"stopped with (\d+) epoch\(s\) finished", out0)
  assert sent and stopped, out0[-2000:]
  finished = int(stopped.group(1))
  assert 1 <= finished < epochs, out0[-2000:]
  assert os.listdir(tmp_path / "pair" / "checkpoints") == [str(finished)]  # both hosts saved the same epoch, once
  resumed = _pair(tmp_path / "pair", extra)
  outs = [p.communicate(timeout=600) for p in resumed]
  for p, (_, err) in zip(resumed, outs):
    assert p.returncode == 0, err[-3000:]
  out = outs[0][0]
  assert f"at epoch {finished}" in out and f"epoch {epochs}/{epochs} |" in out and f"epoch {finished}/" not in out
  single = _train(tmp_path / "single", 2, extra)
  out, err = single.communicate(timeout=600)
  assert single.returncode == 0, err[-3000:]
  pair, single = _exported(tmp_path / "pair", tmp_path / "out_pair"), _exported(tmp_path / "single", tmp_path / "out")
  assert pair.keys() == single.keys() and pair
  for name in single:  # the same bound as test_two_processes_train_like_one (measured 0)
    np.testing.assert_allclose(pair[name], single[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_processes_that_differ_refuse_together(tmp_path):
  """One host given another config value: both processes refuse at start, naming the process and the field."""
  pair = _pair(tmp_path / "pair", per_process=((), ("--config.optim.learning_rate=0.002",)))
  outs = [p.communicate(timeout=300) for p in pair]
  for p, (out, err) in zip(pair, outs):
    assert p.returncode != 0, out[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the processes of this run differ from process 0"), err[-2000:]
    assert "process 1: config.optim.learning_rate = 0.002 (process 0: 0.001)" in last, last
  assert not os.path.exists(tmp_path / "pair" / "checkpoints" / "1")
