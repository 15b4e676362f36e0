"""benchmarks/device_suite.py: the --quick run on the CPU prints a row for every device step (MFU "n/a": the CPU has no
published peak), and the pieces that only a GPU or TPU exercises (chip lookup, MFU, a missing torch) on their own."""

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import device_suite as ds  # noqa: E402
from editr1_jax import plan  # noqa: E402

HEADER = ("step", "attention", "shapes", "ms", "TFLOP/s", "MFU", "peak mem", "torch ms", "torch peak", "ours/torch")


def table(stdout: str) -> list[list[str]]:
  """The printed table's rows (header and rule excluded), cells stripped."""
  lines = [line for line in stdout.splitlines() if " | " in line]
  cells = [[c.strip() for c in line.split(" | ")] for line in lines]
  assert cells and tuple(cells[0]) == HEADER, stdout
  return cells[1:]


def suite(*flags: str) -> subprocess.CompletedProcess:
  """The script as a user runs it on a CPU: one host device, no compilation cache (the session's would only add
  writes: each program compiles once anyway)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  # --quick takes 25-40 s on a 2-core CPU shared with other jobs (device_suite.py's docstring): 60 s left too
  # little room for a busier moment, and a timeout here only guards against a hang, so give it 300 s.
  return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_suite.py"), *flags], cwd=ROOT,
                        env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)


def test_quick_run_on_cpu_prints_every_step():
  t0 = time.perf_counter()
  done = suite("--quick")
  wall = time.perf_counter() - t0
  assert done.returncode == 0, done.stderr[-3000:]
  rows = table(done.stdout)
  # auto and xla both give XLA's kernel on a CPU: one row per step
  assert [(r[0], r[1]) for r in rows] == [(s, "auto (xla)") for s in ds.STEPS], done.stdout
  for step, _, shapes, ms, tflops, mfu, peak, torch_ms, torch_peak, ratio in rows:
    assert float(ms) > 0 and float(tflops) > 0, (step, ms, tflops)  # "failed: ..." would not parse
    assert mfu == "n/a" and peak == "n/a", step  # no published CPU peak; the CPU device keeps no memory count
    if torch_ms != "not installed":
      assert float(torch_ms) > 0 and float(ratio) > 0 and torch_peak == "n/a", (step, torch_ms, ratio)
  assert "no published peak for device kind 'cpu'" in done.stdout
  print(f"device_suite --quick: {wall:.1f} s wall time")


def test_isolated_step_hands_its_row_back():
  """The default away from --quick (each step in its own process, as on a GPU), on one cheap step."""
  done = suite("--quick", "--isolate", "yes", "--steps", "clip", "--no_reference", "--attention_impl", "xla,splash")
  assert done.returncode == 0, done.stderr[-3000:]
  rows = table(done.stdout)  # the parent starts no backend: each choice runs, splash in interpret mode on a CPU
  assert [(r[0], r[1]) for r in rows] == [("clip", "xla (xla)"), ("clip", "splash (splash)")], rows
  for row in rows:
    assert float(row[3]) > 0 and row[7] == "skipped (--no_reference)", row
  assert "peak memory per step (one process each)" in done.stdout


@pytest.mark.parametrize("kind, chip", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", None), ("TPU v4", "v4"),
    ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"), ("cpu", None),
    ("NVIDIA A100-SXM4-80GB", None)])
def test_chip_of_device_kind(kind, chip):
  assert ds.chip_of(kind) is (plan.CHIPS[chip] if chip else None)


def test_mfu_against_the_chip_peak():
  row = dict(step="t5", attention="auto (cudnn)", shapes="s", ms=10.0,
             flops=0.5 * plan.CHIPS["h200"].bf16_flops * 10e-3, peak=2 ** 30,
             ref_ms=20.0, ref_peak=None)
  cells = ds.table_row(row, plan.CHIPS["h200"])
  assert cells[1] == "auto (cudnn)" and cells[5] == "50.0%" and cells[6] == "1.00 GiB" and cells[7] == "20.00" \
      and cells[9] == "0.5", cells
  assert ds.table_row(row, None)[5] == "n/a"
  failed = ds.table_row(dict(step="judge", error="XlaRuntimeError: out of memory", ref_note="no CUDA"), None)
  assert failed[3].startswith("failed: XlaRuntimeError") and failed[7] == "no CUDA", failed


def test_missing_torch_is_named_in_the_row(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
  opts, _, _ = ds.options(ds.parser().parse_args(["--quick"]))
  assert ds.torch_context(opts) == (None, "not installed")


@pytest.mark.parametrize("flags, message", [
    (["--layers", "2"], "--layers='2'"), (["--steps", "flux,judge"], "unknown ['flux']"),
    (["--judge_pairs", "0"], "--judge_pairs=0"), (["--attention_impl", "auto,flash"], "unknown ['flash']")])
def test_bad_flags_name_the_flag(flags, message):
  with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
    ds.options(ds.parser().parse_args(flags))
