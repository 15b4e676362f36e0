"""Edit-R1 training: `python launch/train.py --config=configs/kontext.py --workdir=DIR [--config.x=y ...]`.

Resumes from the workdir's latest checkpoint automatically. On TPU pods and multi-host GPU clusters,
run the same command on every host: `jax.distributed.initialize()` is called when the environment
says there are several processes (or with --coordinator/--num_processes/--process_id given).
The workdir and every folder of the config may be gs:// URLs. SIGTERM (a preemption notice) stops
the run at the next safe point with every finished epoch saved, and the program exits with status 0;
the same command resumes it.
"""

import os
import sys


from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and the tfds copy of the data.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() with cluster auto-detection (Cloud TPU pods, SLURM, "
    "Open MPI). Default: when the environment says there are several processes.")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "Stop after this many epochs (the run can resume later).")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed() -> None:
  import jax
  if _COORDINATOR.value is not None:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value or (_DISTRIBUTED.value is None and _several_processes_in_environment()):
    jax.distributed.initialize()


def _several_processes_in_environment() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  counts = [os.environ.get(k, "1") for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")]
  return "," in hosts or any(c.isdigit() and int(c) > 1 for c in counts)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax and tfds log every step at INFO; --verbosity=0 shows them
    logging.set_verbosity(logging.WARNING)
  _maybe_initialize_distributed()
  import jax
  import tensorflow_datasets as tfds

  from editr1_jax import paths, pod, run_config
  from editr1_jax.data.folder import DatasetError
  from editr1_jax.train_loop import ResumeError, Trainer
  tfds.disable_progress_bar()
  if jax.process_index() == 0:
    print(f"devices: {jax.device_count()} {jax.devices()[0].platform}, processes: {jax.process_count()}", flush=True)
  try:
    trainer = Trainer(_CONFIG.value, _WORKDIR.value)
  except (run_config.ConfigError, DatasetError, paths.PathError, ResumeError, pod.PodMismatch) as e:
    sys.exit(f"error: {e}")
  trainer.run(stop_after=_STOP_AFTER.value)


if __name__ == "__main__":
  app.run(main)
