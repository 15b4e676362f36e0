"""What both benchmark protocols share: the error type, a judge query (what to ask the judge about one item),
and a judged item's result (what aggregation reads).

An `ItemResult` keeps the judge's raw text and the parsed sub-scores, never a derived score: the benchmark
modules derive their metrics from the sub-scores (GEdit: SC = min, PQ = min, O = sqrt(SC * PQ); ImgEdit: the
mean), so a result written by one run can be re-aggregated by another. An answer that could not be parsed is
`parsed=False` with the `reason`; aggregation counts it and leaves it out of every mean (never a 0).
"""

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping

from editr1_jax import paths


class BenchError(ValueError):
  """Bad benchmark input (release files, prompt files, results); the message names the file, row, key or field."""


@dataclasses.dataclass(frozen=True)
class JudgeQuery:
  """One judge call for one item.

  `images` names the pictures by role, in the order the benchmark shows them: "source" (the benchmark's input
  image) and "edited" (the editor's output). `text_first`: the prompt text comes before the images in the one
  user message (ImgEdit's evaluation script) or after them (GEdit-Bench's VIEScore with a Qwen2.5-VL judge).
  `judgement` names the answer in `ItemResult.raw` ("SC" / "PQ" for GEdit-Bench, "score" for ImgEdit).
  """
  item_id: str
  judgement: str
  prompt: str
  images: tuple[str, ...]
  text_first: bool


@dataclasses.dataclass(frozen=True)
class ItemResult:
  """One judged item: identity, the judge's raw answers and what was parsed from them.

  `subscores` maps each judgement to its parsed numbers (GEdit: {"SC": (success, over-editing),
  "PQ": (naturalness, artifacts)}; ImgEdit: {"score": (c1, c2, c3)}); it is empty when `parsed` is False.
  `subsets` tags the item with the benchmark's named subsets (GEdit-Bench: "intersection").
  """
  id: str
  category: str
  language: str
  subscores: Mapping[str, tuple[float, ...]]
  raw: Mapping[str, str]
  parsed: bool
  reason: str = ""
  subsets: tuple[str, ...] = ()

  def to_dict(self) -> dict:
    return {"id": self.id, "category": self.category, "language": self.language,
            "subscores": {k: list(v) for k, v in self.subscores.items()}, "raw": dict(self.raw),
            "parsed": self.parsed, "reason": self.reason, "subsets": list(self.subsets)}


REQUIRED_FIELDS = ("id", "category", "language", "subscores", "raw", "parsed")


def as_result(obj: ItemResult | Mapping, where: str = "result") -> ItemResult:
  """An `ItemResult` as is, or one built from a dict with its fields (checked; errors name the missing field)."""
  if isinstance(obj, ItemResult):
    result = obj
  elif isinstance(obj, Mapping):
    missing = [k for k in REQUIRED_FIELDS if k not in obj]
    if missing:
      raise BenchError(f"{where}: missing field(s) {missing} (an item result has {list(REQUIRED_FIELDS)})")
    unknown = sorted(set(obj) - set(REQUIRED_FIELDS) - {"reason", "subsets"})
    if unknown:
      raise BenchError(f"{where}: unknown field(s) {unknown}")
    if not isinstance(obj["subscores"], Mapping) or not isinstance(obj["raw"], Mapping):
      raise BenchError(f"{where}: 'subscores' and 'raw' must be objects")
    try:
      subscores = {str(k): tuple(float(x) for x in v) for k, v in obj["subscores"].items()}
    except (TypeError, ValueError) as e:
      raise BenchError(f"{where}: 'subscores' must map each judgement to a list of numbers ({e})") from e
    result = ItemResult(str(obj["id"]), str(obj["category"]), str(obj["language"]), subscores,
                        {str(k): str(v) for k, v in obj["raw"].items()}, obj["parsed"], str(obj.get("reason", "")),
                        tuple(str(s) for s in obj.get("subsets", ())))
  else:
    raise BenchError(f"{where}: expected an ItemResult or a dict, got {type(obj).__name__}")
  if not isinstance(result.parsed, bool):
    raise BenchError(f"{where} (item {result.id!r}): 'parsed' must be true or false, got {result.parsed!r}")
  if result.parsed:
    if not result.subscores:
      raise BenchError(f"{where} (item {result.id!r}): parsed but has no sub-scores")
    for name, values in result.subscores.items():
      if not values or not all(math.isfinite(v) for v in values):
        raise BenchError(f"{where} (item {result.id!r}): sub-scores {name!r} must be finite numbers, got {values}")
  elif not result.reason:
    raise BenchError(f"{where} (item {result.id!r}): unparseable but no reason given")
  return result


def as_results(results: Iterable[ItemResult | Mapping]) -> list[ItemResult]:
  """Every result checked (`as_result`); two results with one id are an error (never counted twice)."""
  out, seen = [], set()
  for i, obj in enumerate(results):
    result = as_result(obj, where=f"result {i}")
    if result.id in seen:
      raise BenchError(f"result {i}: item id {result.id!r} appears twice")
    seen.add(result.id)
    out.append(result)
  return out


def write_results(path: str | os.PathLike, results: Iterable[ItemResult | Mapping]) -> None:
  """One JSON object a line (UTF-8, Chinese kept as is), written whole atomically (a path or a gs:// URL)."""
  paths.write_text(path, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in as_results(results)))


def read_results(path: str | os.PathLike) -> list[ItemResult]:
  """What `write_results` wrote; an error names the file and line."""
  path = os.fspath(path)
  if not paths.isfile(path):
    raise BenchError(f"{path}: results file not found")
  results = []
  for lineno, line in enumerate(paths.read_text(path).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise BenchError(f"{path}:{lineno}: malformed JSON: {e.msg}") from e
    results.append(as_result(obj, where=f"{path}:{lineno}"))
  return as_results(results)


def read_json(path: str):
  """A JSON file's value; an error names the file and the line."""
  try:
    return json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise BenchError(f"{path}: malformed JSON: {e.msg} (line {e.lineno})") from e
  except UnicodeDecodeError as e:
    raise BenchError(f"{path}: not UTF-8: {e}") from e


def file_check(folder: str) -> Callable[[str], bool]:
  """`isfile` for many paths below `folder`: in a bucket one listing of the folder (not a request per file); on
  this machine the file system's own answer."""
  if not paths.is_url(folder):
    return paths.isfile
  present = set(paths.stat_tree(folder))
  return lambda path: paths.normpath(path) in present
