"""Preemption: SIGTERM stops a run at the next safe point with every finished epoch saved, and the restarted run
ends bit-identical to one never stopped (in-process stops at chosen points; a real SIGTERM to launch/train.py)."""

import gc
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_train import ROOT, _leaves, tiny_config

from editr1_jax import preemption, train_loop

# 4 groups of 4 with one row per device and micro-batch: an epoch trains in up to two micro-batches of 8 rows
CONFIG = {"num_epochs": 3, "checkpoint_every": 2, "data.groups_per_epoch": 4, "nft.micro_batch": 1}


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
  """This module builds seven trainers in the test process: their compiled programs are dropped when it ends (the
  persistent cache keeps them on disk), so the rest of the suite does not carry them."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  trainer = train_loop.Trainer(tiny_config(**CONFIG), str(tmp_path_factory.mktemp("straight")))
  assert trainer.run()
  return trainer


def _stop_when(monkeypatch, trainer, epoch: int, target: str):
  """Asks for a stop (as SIGTERM would) from inside `target` during `epoch` (0-based): "reward" (before training),
  "accumulate" (after the epoch's first micro-batch), "update_old" (the epoch's last step)."""
  if target == "reward":
    owner, name = trainer.reward, "score"
  else:
    owner, name = trainer.nft, target
  original = getattr(owner, name)

  def wrapped(*args, **kw):
    out = original(*args, **kw)
    if trainer.epoch == epoch:
      preemption.request_stop()
    return out

  monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("target,epoch,saved", [
    ("reward", 2, 2),  # inside epoch 3, before any training: epoch 2 was saved already
    ("accumulate", 0, None),  # inside epoch 1, after a micro-batch: its partial gradient sum is dropped; no epoch
                              # is finished, so nothing is saved
    ("update_old", 0, 1),  # at the end of epoch 1: it is finished, so it is saved
])
def test_a_stop_loses_no_finished_epoch_and_the_restart_is_bit_identical(straight, tmp_path, monkeypatch, target,
                                                                          epoch, saved):
  workdir = str(tmp_path / "run")
  trainer = train_loop.Trainer(tiny_config(**CONFIG), workdir)
  _stop_when(monkeypatch, trainer, epoch, target)
  if target == "accumulate":  # the stop must come between two micro-batches of the epoch
    kept = []
    original = train_loop.train_epoch
    monkeypatch.setattr(train_loop, "train_epoch",
                        lambda *a, **kw: kept.append(a[4].micro_batches(kw["micro_batch"], np.random.default_rng(0))[0])
                        or original(*a, **kw))
  assert trainer.run() is False
  finished = epoch + 1 if target == "update_old" else epoch
  assert trainer.epoch == finished
  assert trainer.checkpoints.all_epochs()[-1:] == ([] if saved is None else [saved])
  if target == "accumulate":
    assert len(kept[-1]) == 2, "the epoch needs two micro-batches for the stop to fall between them"
  monkeypatch.undo()
  resumed = train_loop.Trainer(tiny_config(**CONFIG), workdir)
  assert resumed.epoch == (saved or 0)
  assert resumed.run()
  for a, b in zip(_leaves(resumed.state), _leaves(straight.state)):
    np.testing.assert_array_equal(a, b)
  assert sorted(resumed.sampler.banned) == sorted(straight.sampler.banned)


def test_checks_are_inert_outside_a_run():
  preemption.request_stop()
  preemption.check("outside")  # no run is watching: nothing happens
  with preemption.watch():
    preemption.check("inside, nothing asked")
    preemption.request_stop()
    with pytest.raises(preemption.Preempted, match="stop requested"):
      preemption.check("inside")
  preemption.check("after the run")


def test_sigterm_to_the_train_program(tmp_path):
  """A real SIGTERM during the second epoch's training: exit status 0, epoch 1 saved, the same command resumes."""
  flags = ["--config=configs/tiny.py", "--config.num_epochs=3", "--config.eval_every=0", "--config.checkpoint_every=5",
           "--config.data.groups_per_epoch=2", f"--workdir={tmp_path}"]
  proc = subprocess.Popen([sys.executable, "launch/train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1)
  seen = []
  deadline = time.time() + 300
  sent = False
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    seen.append(line)
    if not sent and "epoch 1/3 |" in line:  # the first epoch is logged: the second one starts now
      proc.send_signal(signal.SIGTERM)
      sent = True
  proc.wait(timeout=60)
  out = "".join(seen)
  assert sent and proc.returncode == 0, out[-3000:]
  assert "stop requested (SIGTERM)" in out and "stopped with 1 epoch(s) finished" in out, out[-3000:]
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  again = subprocess.run([sys.executable, "launch/train.py", *flags], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stdout and "at epoch 1" in again.stdout and "epoch 3/3 |" in again.stdout
  assert "epoch 1/3 |" not in again.stdout  # no finished epoch is redone
