"""Restarts and buckets: the CPU demo resumed with and without the persistent compilation cache, and the demo's
first two epochs with its models, data and workdir local or in a bucket.

  python benchmarks/restart.py [--bucket gs://BUCKET/PREFIX] [--epochs 2]

Each row is one `launch/train.py` process, timed from its start: "first epoch" is when its first epoch's summary
line is printed, "total" when it exits. A resumed run starts from the checkpoint of epoch 1 written by a
preparing run (which also fills `<workdir>/compile_cache`), then trains epoch 2; it is timed with
`--config.compile_cache_dir=none` (every step compiled again) and with the default cache. The bucket rows upload
the demo's models and data under --bucket first (a real bucket, or an emulator named by STORAGE_EMULATOR_HOST);
both two-epoch rows run without a compile cache, so the difference is the storage. Last line: the cache's ratio.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import print_table  # noqa: E402
from editr1_jax import paths  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "editr1_jax", "assets", "demo")
WORLD = os.path.join(ROOT, "editr1_jax", "data", "world")


def timed_run(flags: list[str], cache: str) -> tuple[float, float]:
  """(seconds to the first epoch's summary line, seconds to exit) of one training process."""
  env = dict(os.environ, EDITR1_CACHE=cache)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the run's own cache setting decides
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "train.py"), *flags], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = None
  for line in proc.stdout:
    if first is None and line.startswith("epoch ") and " | " in line:
      first = time.perf_counter() - start
  err = proc.stderr.read()
  if proc.wait() != 0:
    raise RuntimeError(err[-3000:])
  return first, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bucket", default=None, help="gs://bucket/prefix for the bucket rows (left out without)")
  parser.add_argument("--epochs", type=int, default=2)
  args = parser.parse_args()
  base = [f"--config={ROOT}/configs/demo.py", "--config.eval_every=0", "--config.checkpoint_every=1"]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "local_cache")
    workdir = os.path.join(tmp, "resume")
    timed_run(base + [f"--workdir={workdir}", "--config.num_epochs=1"], cache)  # checkpoint 1 and the compile cache
    timings = {}
    for name, extra in (("resumed, no compile cache", ["--config.compile_cache_dir=none"]),
                        ("resumed, compile cache", [])):
      timings[name] = timed_run(base + [f"--workdir={workdir}", "--config.num_epochs=2", *extra], cache)
      paths.rmtree(os.path.join(workdir, "checkpoints", "2"))  # the next row resumes from epoch 1 again
      rows.append([name, "1 (epoch 2)", f"{timings[name][0]:.1f}", f"{timings[name][1]:.1f}"])
    two = base + [f"--config.num_epochs={args.epochs}", "--config.compile_cache_dir=none"]
    first, total = timed_run(two + [f"--workdir={os.path.join(tmp, 'local')}"], cache)
    rows.append([f"{args.epochs} epochs, local folders", str(args.epochs), f"{first:.1f}", f"{total:.1f}"])
    if args.bucket:
      models, world = paths.join(args.bucket, "demo"), paths.join(args.bucket, "world")
      paths.upload_folder(DEMO, models)
      paths.upload_folder(WORLD, world)
      first, total = timed_run(two + [
          f"--workdir={paths.join(args.bucket, 'run')}", f"--config.model.pipeline_dir={models}/editor",
          f"--config.reward.model_dir={models}/judge", f"--config.reward.template_file={models}/judge_prompt.txt",
          f"--config.data.dataset_dir={world}"], os.path.join(tmp, "bucket_cache"))
      rows.append([f"{args.epochs} epochs, everything in {args.bucket}", str(args.epochs), f"{first:.1f}",
                   f"{total:.1f}"])
  print_table(["run", "epochs", "first epoch (s)", "total (s)"], rows)
  cold, warm = timings["resumed, no compile cache"][0], timings["resumed, compile cache"][0]
  print(f"restart_first_epoch with/without compile cache ratio: {warm / cold:.3f}")


if __name__ == "__main__":
  main()
