"""GEdit-Bench (Step1X-Edit) with its VIEScore protocol: the release reader, the judge prompts read from the
user's copy, the two judge queries per item, an item's result and the per-language summaries.

The release (Hugging Face dataset stepfun-ai/GEdit-Bench, one split "train") as a folder of either
- Parquet files (`*.parquet`, e.g. the hub's Parquet conversion `default/train/0000.parquet`), or
- Arrow files as `datasets` saves them (`train/data-00000-of-0000N.arrow` beside `state.json`),
with the columns key, task_type, instruction, instruction_language ("en" / "cn"), input_image and
input_image_raw (images as `datasets` stores them: a struct of bytes and path), Intersection_exist (bool).
`input_image` is the picture the judge compares against (GEdit's evaluation saves it as `<key>_SRCIMG.png`);
`input_image_raw` is the unprocessed original that editors start from.

Protocol (GEdit-Bench `test_gedit_score.py` + `viescore/__init__.py`, task "tie"):
- SC prompt = context + two-image edit rule + the "tie" SC rule joined by newlines, "<instruction>" replaced by the
  item's instruction; shown with [source, edited]; the answer's two scores (editing success, over-editing) -> SC = min.
- PQ prompt = context + PQ rule; shown with [edited] only; two scores (naturalness, artifacts) -> PQ = min.
- The edited image is resized to the source image's size before judging (`resize_like`).
- O = sqrt(SC * PQ) per item; per task type the means of SC, PQ and O; the overall of each is the mean of the 11
  task-type means (`calculate_statistics.py`), reported per instruction language (and, as there, optionally over
  the items with Intersection_exist only).

The prompt texts are never shipped here: `load_prompts` reads them from the user's copy, either the generated
module `viescore/vie_prompts.py` of the GEdit-Bench release (read as data with `ast`, never executed) or
VIEScore's raw text files (`prompts_raw/context_no_delimit.txt`, `prompts_raw/prompts_0shot/{two_image_edit_rule,
tie_rule_SC,rule_PQ}.txt`).
"""

import ast
import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence

from PIL import Image

from editr1_jax import images, paths
from editr1_jax.bench import aggregate, parsing
from editr1_jax.bench.base import BenchError, ItemResult, JudgeQuery, as_results

BENCHMARK = "GEdit-Bench"
TASK_TYPES = ("background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
              "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer")
LANGUAGES = ("en", "cn")  # the release's instruction_language values, in report order
METRICS = ("SC", "PQ", "O")
SCORE_RANGE = (0.0, 10.0)
INTERSECTION = "intersection"

TEXT_COLUMNS = ("key", "task_type", "instruction", "instruction_language")
IMAGE_COLUMNS = {"input": "input_image", "raw": "input_image_raw"}
REQUIRED_COLUMNS = TEXT_COLUMNS + ("input_image",)
OPTIONAL_COLUMNS = ("input_image_raw", "Intersection_exist")

INSTRUCTION_PLACEHOLDER = "<instruction>"
PROMPT_VARIABLES = {"context": "_context_no_delimit", "edit_rule": "_prompts_0shot_two_image_edit_rule",
                    "sc_rule": "_prompts_0shot_tie_rule_SC", "pq_rule": "_prompts_0shot_rule_PQ"}
PROMPT_FILES = {"context": "context_no_delimit.txt", "edit_rule": "prompts_0shot/two_image_edit_rule.txt",
                "sc_rule": "prompts_0shot/tie_rule_SC.txt", "pq_rule": "prompts_0shot/rule_PQ.txt"}
PROMPT_MODULE_PLACES = ("vie_prompts.py", "viescore/vie_prompts.py", "GEdit-Bench/viescore/vie_prompts.py")
PROMPT_FOLDER_PLACES = (".", "prompts_raw", "viescore/prompts_raw")


# ---------------------------------------------------------------------------------------------------- the release


@dataclasses.dataclass(frozen=True)
class Item:
  key: str
  task_type: str
  instruction: str
  language: str
  intersection: bool | None
  file: str  # the data file holding the row
  row: int  # the row in that file

  @property
  def id(self) -> str:
    """Unique over the release (a key appears once per language): task_type/language/key."""
    return f"{self.task_type}/{self.language}/{self.key}"

  @property
  def edited_name(self) -> str:
    """Where GEdit-Bench's evaluation expects the edit, under `<method>/fullset/`: task_type/language/key.png."""
    return f"{self.id}.png"


def _data_files(folder: str) -> tuple[str, list[str]]:
  if not paths.isdir(folder):
    raise BenchError(f"{folder}: GEdit-Bench folder not found")
  # every file below the folder, hidden ones left out (as a recursive glob does: e.g. the hub client's .cache/)
  found = [rel for rel in paths.walk_files(folder) if not any(part.startswith(".") for part in rel.split("/"))]
  parquet = [paths.join(folder, rel) for rel in found if rel.endswith(".parquet")]
  arrow = [paths.join(folder, rel) for rel in found
           if rel.endswith(".arrow") and not paths.basename(rel).startswith("cache-")]  # `datasets` map caches
  if parquet and arrow:
    raise BenchError(f"{folder}: holds both .parquet and .arrow files; give the folder of one copy of the release")
  if not parquet and not arrow:
    raise BenchError(f"{folder}: no GEdit-Bench data files (expected *.parquet, e.g. data/train-*.parquet, or the "
                     f"Arrow files of the stepfun-ai/GEdit-Bench release, train/data-*-of-*.arrow)")
  return ("parquet", parquet) if parquet else ("arrow", arrow)


def _arrow_source(path: str):
  """A local file memory-mapped; an object in a bucket read whole (an Arrow stream is read whole anyway)."""
  import pyarrow as pa
  return pa.BufferReader(paths.read_bytes(path)) if paths.is_url(path) else pa.memory_map(path)


def _arrow_table(path: str):
  import pyarrow as pa
  try:
    return pa.ipc.open_stream(_arrow_source(path)).read_all()  # what `datasets` writes
  except pa.ArrowInvalid:
    try:
      return pa.ipc.open_file(_arrow_source(path)).read_all()
    except pa.ArrowInvalid as e:
      raise BenchError(f"{path}: not an Arrow IPC file: {e}") from e


def _check_image_type(path: str, name: str, typ) -> None:
  import pyarrow as pa
  if pa.types.is_struct(typ):
    fields = {typ.field(i).name: typ.field(i).type for i in range(typ.num_fields)}
    if "bytes" in fields and (pa.types.is_binary(fields["bytes"]) or pa.types.is_large_binary(fields["bytes"])):
      return
  elif pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
    return
  raise BenchError(f"{path}: column {name!r} has type {typ}; expected an image (struct with binary 'bytes')")


class Release:
  """The GEdit-Bench release in `folder`: `items` (validated metadata of every row) and their images on demand.

  Every data file must hold the required columns (an error names the file and the missing columns); every row a
  known task type, a non-empty key, instruction and language (an error names the file and row). Images are read
  only when asked for (`image_bytes`, `load_image`); a Parquet row group or an Arrow file (memory-mapped) stays
  cached, so reading the items in order reads each file once. `folder` may be a gs:// URL: a Parquet file's row
  groups are then read by byte ranges, an Arrow file whole.
  """

  def __init__(self, folder: str | os.PathLike):
    self.folder = os.fspath(folder)
    self.format, self.files = _data_files(self.folder)
    self.items: list[Item] = []
    self._arrow = {}
    self._parquet = {}  # parquet file -> its open pq.ParquetFile
    self._rows = {}  # parquet file -> row-group start offsets
    self._cache = None  # (file, row group, column) -> array
    self.columns = {}
    seen = {}
    for path in self.files:
      schema = self._parquet_file(path).schema_arrow if self.format == "parquet" else self._table(path).schema
      names = set(schema.names)
      missing = [c for c in REQUIRED_COLUMNS if c not in names]
      if missing:
        raise BenchError(f"{path}: missing column(s) {missing}; a GEdit-Bench data file has {list(REQUIRED_COLUMNS)} "
                         f"(and {list(OPTIONAL_COLUMNS)})")
      for name in IMAGE_COLUMNS.values():
        if name in names:
          _check_image_type(path, name, schema.field(name).type)
      self.columns[path] = names
      wanted = [c for c in TEXT_COLUMNS + ("Intersection_exist",) if c in names]
      if self.format == "parquet":
        table = self._parquet_file(path).read(columns=wanted)
        meta = self._parquet_file(path).metadata
        starts, total = [], 0
        for g in range(meta.num_row_groups):
          starts.append(total)
          total += meta.row_group(g).num_rows
        self._rows[path] = starts
      else:
        table = self._table(path).select(wanted)
      columns = table.to_pydict()
      for row in range(table.num_rows):
        self.items.append(self._item(path, row, {c: columns[c][row] for c in wanted}, seen))

  def _parquet_file(self, path: str):
    import pyarrow.parquet as pq
    if path not in self._parquet:
      self._parquet[path] = pq.ParquetFile(paths.open(path, "rb") if paths.is_url(path) else path)
    return self._parquet[path]

  def _table(self, path: str):
    if path not in self._arrow:
      self._arrow[path] = _arrow_table(path)
    return self._arrow[path]

  @staticmethod
  def _item(path: str, row: int, values: Mapping, seen: dict) -> Item:
    where = f"{path}: row {row}"
    for c in TEXT_COLUMNS:
      v = values[c]
      if not isinstance(v, str) or not v.strip():
        raise BenchError(f"{where}: column {c!r} must be a non-empty string, got {v!r}")
    if values["task_type"] not in TASK_TYPES:
      raise BenchError(f"{where}: task_type {values['task_type']!r} is not a GEdit-Bench task type {list(TASK_TYPES)}")
    flag = values.get("Intersection_exist")
    if flag is not None and not isinstance(flag, bool):
      raise BenchError(f"{where}: column 'Intersection_exist' must be true/false, got {flag!r}")
    item = Item(values["key"], values["task_type"], values["instruction"], values["instruction_language"], flag,
                path, row)
    if item.id in seen:
      raise BenchError(f"{where}: item {item.id} (task type/language/key) also at {seen[item.id]}")
    seen[item.id] = where
    return item

  @property
  def languages(self) -> list[str]:
    found = {item.language for item in self.items}
    return [l for l in LANGUAGES if l in found] + sorted(found - set(LANGUAGES))

  def image_bytes(self, item: Item, which: str = "input") -> bytes:
    """The encoded image of `item`: "input" (input_image, what the judge compares against) or "raw"
    (input_image_raw, the unprocessed original)."""
    if which not in IMAGE_COLUMNS:
      raise BenchError(f"image {which!r}: expected one of {list(IMAGE_COLUMNS)}")
    column = IMAGE_COLUMNS[which]
    if column not in self.columns[item.file]:
      raise BenchError(f"{item.file}: no column {column!r} (item {item.id})")
    if self.format == "parquet":
      import bisect
      starts = self._rows[item.file]
      group = bisect.bisect_right(starts, item.row) - 1
      key = (item.file, group, column)
      if self._cache is None or self._cache[0] != key:
        array = self._parquet_file(item.file).read_row_group(group, columns=[column]).column(column)
        self._cache = (key, array)
      value = self._cache[1][item.row - starts[group]].as_py()
    else:
      value = self._table(item.file).column(column)[item.row].as_py()
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, bytes) or not data:
      raise BenchError(f"{item.file}: row {item.row}: column {column!r} holds no image bytes (item {item.id})")
    return data

  def load_image(self, item: Item, which: str = "input") -> Image.Image:
    """`image_bytes` decoded to 8-bit RGB (`editr1_jax.images`); an error names the file, row and column."""
    return images.load_rgb(self.image_bytes(item, which),
                           where=f"{item.file}: row {item.row}: {IMAGE_COLUMNS[which]} (item {item.id})")


def read(folder: str | os.PathLike) -> Release:
  """The GEdit-Bench release in `folder` (see `Release`)."""
  return Release(folder)


def resize_like(edited: Image.Image, source: Image.Image) -> Image.Image:
  """The edited image at the source image's size, as GEdit-Bench resizes it before judging (PIL's default filter
  for RGB, bicubic)."""
  if edited.size == source.size:
    return edited
  return edited.resize(source.size, Image.Resampling.BICUBIC)


# -------------------------------------------------------------------------------------------------- judge prompts


@dataclasses.dataclass(frozen=True)
class Prompts:
  """VIEScore's four texts for the "tie" (text-guided image editing) task, as read from the user's copy."""
  context: str
  edit_rule: str
  sc_rule: str
  pq_rule: str
  source: str = ""  # where they were read from

  def sc_prompt(self, instruction: str) -> str:
    return "\n".join([self.context, self.edit_rule, self.sc_rule]).replace(INSTRUCTION_PLACEHOLDER, instruction)

  def pq_prompt(self) -> str:
    return "\n".join([self.context, self.pq_rule])


def _module_strings(path: str) -> dict[str, str]:
  """Top-level `name = "string"` assignments of a Python file, read as data (the file is never executed)."""
  try:
    with paths.open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
  except (SyntaxError, UnicodeDecodeError) as e:
    raise BenchError(f"{path}: not a readable Python file: {e}") from e
  out = {}
  for node in tree.body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
      if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        out[node.targets[0].id] = node.value.value
  return out


def _checked(texts: dict[str, str], source: str) -> Prompts:
  if INSTRUCTION_PLACEHOLDER not in texts["sc_rule"]:
    raise BenchError(f"{source}: the SC rule ({PROMPT_VARIABLES['sc_rule']}) has no {INSTRUCTION_PLACEHOLDER} "
                     f"placeholder")
  return Prompts(source=source, **texts)


def load_prompts(folder: str | os.PathLike) -> Prompts:
  """VIEScore's prompts from the user's copy of GEdit-Bench (or VIEScore): `folder` holds `vie_prompts.py`
  (directly, in `viescore/` or in `GEdit-Bench/viescore/`) or VIEScore's raw text files (directly, in
  `prompts_raw/` or `viescore/prompts_raw/`). An error names the missing file or variable."""
  folder = os.fspath(folder)
  if folder.endswith(".py") and paths.isfile(folder):
    modules = [folder]
  else:
    if not paths.isdir(folder):
      raise BenchError(f"{folder}: GEdit-Bench prompt folder not found")
    modules = [paths.join(folder, p) for p in PROMPT_MODULE_PLACES if paths.isfile(paths.join(folder, p))]
  if modules:
    path = modules[0]
    strings = _module_strings(path)
    missing = [v for v in PROMPT_VARIABLES.values() if v not in strings]
    if missing:
      raise BenchError(f"{path}: missing prompt variable(s) {missing}")
    return _checked({k: strings[v] for k, v in PROMPT_VARIABLES.items()}, path)
  for place in PROMPT_FOLDER_PLACES:
    root = paths.normpath(paths.join(folder, place))
    if paths.isfile(paths.join(root, PROMPT_FILES["sc_rule"])):
      texts = {}
      for name, rel in PROMPT_FILES.items():
        path = paths.join(root, rel)
        if not paths.isfile(path):
          raise BenchError(f"{path}: prompt file not found")
        with paths.open(path, encoding="utf-8") as f:
          texts[name] = f.read()
      return _checked(texts, root)
  raise BenchError(f"{folder}: no VIEScore prompts: expected one of {list(PROMPT_MODULE_PLACES)} or the text files "
                   f"{list(PROMPT_FILES.values())} (directly or under {list(PROMPT_FOLDER_PLACES[1:])})")


def queries(item: Item, prompts: Prompts) -> tuple[JudgeQuery, JudgeQuery]:
  """The item's two judge calls: SC with [source, edited], PQ with [edited]; images before the text."""
  return (JudgeQuery(item.id, "SC", prompts.sc_prompt(item.instruction), ("source", "edited"), False),
          JudgeQuery(item.id, "PQ", prompts.pq_prompt(), ("edited",), False))


# --------------------------------------------------------------------------------------------- results and scores


def judge_item(item: Item, sc_text: str, pq_text: str) -> ItemResult:
  """The item's result from the judge's two answers (each two 0..10 scores); unparseable if either is."""
  low, high = SCORE_RANGE
  sc = parsing.parse_viescore(sc_text, 2, low, high)
  pq = parsing.parse_viescore(pq_text, 2, low, high)
  reasons = [f"{name}: {p.reason}" for name, p in (("SC", sc), ("PQ", pq)) if not p.ok]
  return ItemResult(item.id, item.task_type, item.language,
                    {"SC": sc.scores, "PQ": pq.scores} if not reasons else {}, {"SC": sc_text, "PQ": pq_text},
                    not reasons, "; ".join(reasons), (INTERSECTION,) if item.intersection else ())


def item_metrics(result: ItemResult) -> dict[str, float]:
  """SC = min of the SC scores, PQ = min of the PQ scores, O = sqrt(SC * PQ) (VIEScore)."""
  for name in ("SC", "PQ"):
    if not result.subscores.get(name):
      raise BenchError(f"item {result.id!r}: no {name} sub-scores")
  sc, pq = min(result.subscores["SC"]), min(result.subscores["PQ"])
  if sc < 0 or pq < 0:
    raise BenchError(f"item {result.id!r}: negative score (SC {sc}, PQ {pq})")
  return {"SC": sc, "PQ": pq, "O": math.sqrt(sc * pq)}


def summarize(results: Iterable[ItemResult | Mapping], *, languages: Sequence[str] | None = None,
              categories: Sequence[str] | None = TASK_TYPES, intersection_only: bool = False
              ) -> dict[str, aggregate.Summary]:
  """One summary per instruction language (never pooled across languages): per task type the means of SC, PQ, O
  and their mean over the task types. `languages` None: those in the results. `categories`: the 11 task types
  (None: those in the results). `intersection_only`: the Intersection_exist items only, as GEdit-Bench's second
  table."""
  results = as_results(results)
  if languages is None:
    found = {r.language for r in results}
    languages = [l for l in LANGUAGES if l in found] + sorted(found - set(LANGUAGES))
  out = {}
  for language in languages:
    chosen = [r for r in results if r.language == language and (not intersection_only or INTERSECTION in r.subsets)]
    subset = f"{language}, {INTERSECTION}" if intersection_only else language
    out[language] = aggregate.summarize(chosen, benchmark=BENCHMARK, metrics=METRICS, metric_fn=item_metrics,
                                        categories=categories, subset=subset)
  return out


def summaries(results: Iterable[ItemResult | Mapping], languages: Sequence[str] | None = None
              ) -> dict[str, aggregate.Summary]:
  """Both of GEdit-Bench's tables per language, as its `calculate_statistics.py` computes them: every item ("en"),
  then the Intersection_exist items ("en_intersection"). `languages`: as `summarize`."""
  results = as_results(results)
  full = summarize(results, languages=languages)
  inter = summarize(results, languages=list(full), intersection_only=True)
  return {key: table for language in full
          for key, table in ((language, full[language]), (f"{language}_{INTERSECTION}", inter[language]))}


def release_info(folder: str | os.PathLike) -> dict:
  """Counts per language and task type (a check that a copy is complete: the release has 606 items per
  language)."""
  release = read(folder)
  counts = {}
  for item in release.items:
    counts.setdefault(item.language, {}).setdefault(item.task_type, 0)
    counts[item.language][item.task_type] += 1
  return {"folder": release.folder, "format": release.format, "files": release.files,
          "items": len(release.items), "per_language": counts}
