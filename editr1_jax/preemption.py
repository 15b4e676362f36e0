"""Stopping at a safe point when the machine is about to go away (spot / preemptible TPU VMs and most schedulers
send SIGTERM, then kill the process about 30 seconds later).

The signal only asks; the run stops at the next *check*: between device chunks of the rollouts, the encoders and
the judge, between NFT micro-batches, and at the end of an epoch. `Trainer.run` then saves what is finished and
returns (docs in `Trainer.run`). A check is cheap and never waits on the device.

With several processes every one must stop at the same check, though the signal may reach one host only. jax's
preemption service (started by `jax.distributed.initialize`) catches SIGTERM on any host and makes
`reached_preemption_sync_point(n)` true on every process at the same `n`; every process calls the checks in the
same order (they run the same program on the same plan), so `n` is simply the number of checks so far. A single
process catches the signal itself.
"""

import contextlib
import signal
import threading
from typing import Iterator

import jax


class Preempted(Exception):
  """A stop was asked (SIGTERM) and this check is where every process stops. A loop over donated states sets
  `state` to the live one before passing it on."""


class _State:
  armed = False  # checks count only inside `watch()` (a training run); elsewhere they are no-ops
  checks = 0
  requested = threading.Event()


def request_stop() -> None:
  """What SIGTERM does in a single process: the next check stops the run."""
  _State.requested.set()


def stop_requested() -> bool:
  """True at the check where every process stops. Must be called in the same order on every process."""
  if not _State.armed:
    return False
  _State.checks += 1
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.reached_preemption_sync_point(_State.checks)
  return _State.requested.is_set()


def check(where: str = "") -> None:
  """Raises Preempted when the run must stop here."""
  if stop_requested():
    raise Preempted(f"stop requested (SIGTERM){' ' + where if where else ''}")


@contextlib.contextmanager
def watch() -> Iterator[None]:
  """Checks are live inside; a single process catches SIGTERM itself (with several, jax's service does)."""
  previous = None
  if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: request_stop())
  _State.armed, _State.checks = True, 0
  _State.requested.clear()
  try:
    yield
  finally:
    _State.armed = False
    _State.requested.clear()
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
