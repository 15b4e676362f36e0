"""Timing and table printing shared by the benchmark scripts."""

import statistics
import time
from typing import Callable, Sequence


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
