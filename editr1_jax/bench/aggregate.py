"""Per-item results -> per-category means and the benchmark's overall score; a Markdown table; the per-category
differences of two summaries.

Both benchmarks define the overall score as a macro average: the unweighted mean of the category means (GEdit-Bench's
`calculate_statistics.py` averages its 11 task-type means; ImgEdit's leaderboard averages its nine edit-type means,
which its `step2_typescore.py` computes). So an overall exists only when every category of the summary has at least
one scored item; otherwise it is None and the empty categories are listed in `missing`.

An unparseable item counts in `n` and `n_unparseable` of its category and in no mean.
"""

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from editr1_jax.bench.base import BenchError, ItemResult, as_results

MetricFn = Callable[[ItemResult], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class CategoryStats:
  n: int  # items judged (scored + unparseable)
  n_unparseable: int
  means: Mapping[str, float | None]  # None when no item of the category was scored

  @property
  def n_scored(self) -> int:
    return self.n - self.n_unparseable


@dataclasses.dataclass(frozen=True)
class Summary:
  """One benchmark (subset)'s scores: `categories` in the benchmark's order, `overall` = mean of category means."""
  benchmark: str
  subset: str  # e.g. "en", "cn", "en, intersection", "all"
  metrics: tuple[str, ...]
  categories: Mapping[str, CategoryStats]
  overall: Mapping[str, float | None]
  missing: tuple[str, ...]  # categories with no scored item (the overall is None then)
  labels: Mapping[str, str] = dataclasses.field(default_factory=dict)  # display names of categories

  @property
  def n(self) -> int:
    return sum(c.n for c in self.categories.values())

  @property
  def n_unparseable(self) -> int:
    return sum(c.n_unparseable for c in self.categories.values())

  def to_dict(self) -> dict:
    return {"benchmark": self.benchmark, "subset": self.subset, "metrics": list(self.metrics),
            "categories": {name: {"n": c.n, "n_unparseable": c.n_unparseable, "means": dict(c.means)}
                           for name, c in self.categories.items()},
            "overall": dict(self.overall), "missing": list(self.missing), "labels": dict(self.labels),
            "n": self.n, "n_unparseable": self.n_unparseable}

  @classmethod
  def from_dict(cls, d: Mapping) -> "Summary":
    try:
      categories = {name: CategoryStats(int(c["n"]), int(c["n_unparseable"]), dict(c["means"]))
                    for name, c in d["categories"].items()}
      return cls(d["benchmark"], d["subset"], tuple(d["metrics"]), categories, dict(d["overall"]),
                 tuple(d["missing"]), dict(d.get("labels", {})))
    except (KeyError, TypeError, AttributeError) as e:
      raise BenchError(f"not a summary (as Summary.to_dict writes): {e!r}") from e


def _mean(values: list[float]) -> float | None:
  return math.fsum(values) / len(values) if values else None


def summarize(results: Iterable[ItemResult | Mapping], *, benchmark: str, metrics: Sequence[str],
              metric_fn: MetricFn, categories: Sequence[str] | None = None, subset: str = "all",
              labels: Mapping[str, str] | None = None) -> Summary:
  """Per-category means of each metric (`metric_fn` of every parsed result) and their macro average.

  `categories`: the benchmark's categories, in report order (an empty one makes the overall None); None: the
  categories seen, sorted. A result whose category is not among `categories` is an error (never dropped).
  """
  results = as_results(results)
  if categories is None:
    categories = sorted({r.category for r in results})
  categories = list(categories)
  known = set(categories)
  values = {c: {m: [] for m in metrics} for c in categories}
  counts = {c: [0, 0] for c in categories}
  for r in results:
    if r.category not in known:
      raise BenchError(f"item {r.id!r}: category {r.category!r} is not one of {categories}")
    counts[r.category][0] += 1
    if not r.parsed:
      counts[r.category][1] += 1
      continue
    item = metric_fn(r)
    for m in metrics:
      if m not in item or not math.isfinite(item[m]):
        raise BenchError(f"item {r.id!r}: metric {m!r} missing or not finite ({dict(item)})")
      values[r.category][m].append(float(item[m]))
  stats = {c: CategoryStats(counts[c][0], counts[c][1], {m: _mean(values[c][m]) for m in metrics})
           for c in categories}
  missing = tuple(c for c in categories if stats[c].n_scored == 0)
  overall = {m: None if missing or not categories else _mean([stats[c].means[m] for c in categories])
             for m in metrics}
  return Summary(benchmark, subset, tuple(metrics), stats, overall, missing, dict(labels or {}))


def _fmt(value: float | None, decimals: int) -> str:
  return "-" if value is None else f"{value:.{decimals}f}"


def _signed(value: float | None, decimals: int) -> str:
  return "-" if value is None else f"{value:+.{decimals}f}"


def to_markdown(summary: Summary | Mapping[str, Summary], decimals: int = 3) -> str:
  """A Markdown table per summary: one row per category (n, unparseable, each metric's mean), then the overall."""
  if isinstance(summary, Mapping):
    return "\n\n".join(to_markdown(s, decimals) for s in summary.values())
  lines = [f"**{summary.benchmark}** ({summary.subset})", "",
           "| category | n | unparseable | " + " | ".join(summary.metrics) + " |",
           "| --- | ---: | ---: | " + " | ".join("---:" for _ in summary.metrics) + " |"]
  for name, c in summary.categories.items():
    cells = [summary.labels.get(name, name), str(c.n), str(c.n_unparseable)]
    lines.append("| " + " | ".join(cells + [_fmt(c.means[m], decimals) for m in summary.metrics]) + " |")
  what = f"overall (mean of {len(summary.categories)} category means)"
  cells = [what, str(summary.n), str(summary.n_unparseable)]
  lines.append("| " + " | ".join(cells + [_fmt(summary.overall[m], decimals) for m in summary.metrics]) + " |")
  if summary.missing:
    lines += ["", "No scored item in: " + ", ".join(summary.labels.get(c, c) for c in summary.missing)
              + " (no overall score)."]
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Delta:
  a: float | None
  b: float | None

  @property
  def delta(self) -> float | None:
    return None if self.a is None or self.b is None else self.b - self.a


@dataclasses.dataclass(frozen=True)
class Comparison:
  """b - a for every category and metric (categories of either summary, a's order first), and the overall."""
  benchmark: str
  subset: str
  metrics: tuple[str, ...]
  categories: Mapping[str, Mapping[str, Delta]]
  unparseable: Mapping[str, tuple[int | None, int | None]]  # per category: (a, b); None where absent
  overall: Mapping[str, Delta]
  labels: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    def row(deltas):
      return {m: {"a": d.a, "b": d.b, "delta": d.delta} for m, d in deltas.items()}
    return {"benchmark": self.benchmark, "subset": self.subset, "metrics": list(self.metrics),
            "categories": {c: row(v) for c, v in self.categories.items()},
            "unparseable": {c: list(v) for c, v in self.unparseable.items()}, "overall": row(self.overall)}


def compare(a: Summary | Mapping[str, Summary], b: Summary | Mapping[str, Summary]
            ) -> Comparison | dict[str, Comparison]:
  """Per-category and overall differences b - a of two summaries of one benchmark (and subset); for two mappings
  of summaries (GEdit-Bench's per-language ones), one comparison per key (the keys must agree)."""
  if isinstance(a, Mapping) or isinstance(b, Mapping):
    if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
      raise BenchError("compare: give two summaries or two mappings of summaries")
    if set(a) != set(b):
      raise BenchError(f"compare: the summaries cover different subsets: {sorted(a)} vs {sorted(b)}")
    return {k: compare(a[k], b[k]) for k in a}
  if (a.benchmark, a.subset, a.metrics) != (b.benchmark, b.subset, b.metrics):
    raise BenchError(f"compare: {a.benchmark} ({a.subset}, {list(a.metrics)}) vs {b.benchmark} ({b.subset}, "
                     f"{list(b.metrics)}): not the same benchmark, subset and metrics")
  names = list(a.categories) + [c for c in b.categories if c not in a.categories]
  categories, unparseable = {}, {}
  for c in names:
    ca, cb = a.categories.get(c), b.categories.get(c)
    categories[c] = {m: Delta(ca.means[m] if ca else None, cb.means[m] if cb else None) for m in a.metrics}
    unparseable[c] = (ca.n_unparseable if ca else None, cb.n_unparseable if cb else None)
  overall = {m: Delta(a.overall[m], b.overall[m]) for m in a.metrics}
  return Comparison(a.benchmark, a.subset, a.metrics, categories, unparseable, overall, {**b.labels, **a.labels})


def comparison_markdown(comparison: Comparison | Mapping[str, Comparison], decimals: int = 3,
                        names: tuple[str, str] = ("a", "b")) -> str:
  """A Markdown table: per category and metric the two means and the difference (b - a), and the overall."""
  if isinstance(comparison, Mapping):
    return "\n\n".join(comparison_markdown(c, decimals, names) for c in comparison.values())
  a, b = names
  head = ["category", f"unparseable {a}/{b}"]
  for m in comparison.metrics:
    head += [f"{m} {a}", f"{m} {b}", f"\u0394{m}"]
  lines = [f"**{comparison.benchmark}** ({comparison.subset}): {b} - {a}", "",
           "| " + " | ".join(head) + " |", "| --- | ---: | " + " | ".join("---:" for _ in head[2:]) + " |"]

  def cells(deltas):
    out = []
    for m in comparison.metrics:
      d = deltas[m]
      out += [_fmt(d.a, decimals), _fmt(d.b, decimals), _signed(d.delta, decimals)]
    return out

  for c, deltas in comparison.categories.items():
    ua, ub = comparison.unparseable[c]
    counts = f"{'-' if ua is None else ua}/{'-' if ub is None else ub}"
    lines.append("| " + " | ".join([comparison.labels.get(c, c), counts] + cells(deltas)) + " |")
  totals = [sum(v[i] or 0 for v in comparison.unparseable.values()) for i in (0, 1)]
  lines.append("| " + " | ".join(["overall", f"{totals[0]}/{totals[1]}"] + cells(comparison.overall)) + " |")
  return "\n".join(lines)
