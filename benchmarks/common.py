"""Timing and table printing shared by the benchmark scripts."""

import argparse
import os
import statistics
import time
from typing import Callable, Sequence


def arguments(sizes: str, repeats: int | None = None) -> argparse.ArgumentParser:
  """`--sizes` (comma-separated) and, given a default, `--repeats`; each script adds its own flags."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default=sizes)
  if repeats is not None:
    parser.add_argument("--repeats", type=int, default=repeats)
  return parser


def same_footing() -> None:
  """Before timing: float32 matmuls at full precision in jax (as torch computes them), every core for torch."""
  import jax
  import torch
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.set_num_threads(os.cpu_count())


def median_ms(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              block: Callable[[object], object] = lambda x: x) -> float:
  """Median wall time of `fn` in ms; `block` waits for asynchronous results (e.g. jax.block_until_ready)."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn())
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
  cells = [[str(h) for h in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  for j, r in enumerate(cells):
    print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    if j == 0:
      print("-+-".join("-" * w for w in widths))
