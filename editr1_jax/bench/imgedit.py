"""ImgEdit-Bench, Basic (single-turn) suite: the release reader, the judge prompts read from the user's copy, the
judge query per item, an item's result and the summary.

The suite ships in two layouts, read alike:
- the Hugging Face dataset (sysuyy/ImgEdit, `Benchmark.tar` -> `Benchmark/singleturn/`): `singleturn.json`, the
  items, and `judge_prompt.json`, the judge prompts, beside the images;
- the GitHub repository (PKU-YuanGroup/ImgEdit, `Benchmark/Basic/`): `basic_edit.json`, the items, and the judge
  prompts as `prompts.json` (its scripts' `--prompts_json`); the images come from the tarball (`--origin_img_root`).
Items: {key: {"id": image path relative to the image folder, "prompt": instruction, "edit_type": type}}; prompts:
{edit type: judge prompt}, each with the placeholder "<edit_prompt>"; the images in sub-folders (animal/,
architecture/, clothes/, compose/, daily object/, for_add/, human/, style/, transport/). `read` and `load_prompts`
take the files by name or find them in a folder. Edits are expected as `<key>.png`.

Protocol (ImgEdit `Benchmark/Basic/basic_bench.py`, `step1_get_avgscore.py`, `step2_typescore.py`): the prompt of the
item's edit type with "<edit_prompt>" replaced by the instruction, then [original, edited] (text first); the answer
gives three 1..5 scores, one line each ("<criterion>: <n>"); the item's score is their mean, a type's score the
mean of its items, and the overall the unweighted mean of the nine types. The release's scripts round an item's
mean and a type's mean to 2 decimals and drop answers they cannot read; we keep full precision and count the
unreadable ones.

The nine edit types, with the release's names: add, adjust, extract, replace, remove, background, style,
compose (the paper's "hybrid"), action. The prompts are never shipped here: `load_prompts` reads the user's
`judge_prompt.json`.
"""

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence

from editr1_jax import paths
from editr1_jax.bench import aggregate, parsing
from editr1_jax.bench.base import BenchError, ItemResult, JudgeQuery, as_results, file_check, read_json

BENCHMARK = "ImgEdit"
EDIT_TYPES = ("add", "adjust", "extract", "replace", "remove", "background", "style", "compose", "action")
LABELS = {"compose": "hybrid (compose)"}
ALIASES = {"alter": "adjust"}  # the name of "adjust" in an early basic_edit.json of the ImgEdit repository
METRICS = ("score",)
SCORE_RANGE = (1.0, 5.0)
ITEMS_FILE = "singleturn.json"  # the Hugging Face tarball's names
PROMPTS_FILE = "judge_prompt.json"
GITHUB_ITEMS_FILE = "basic_edit.json"  # the GitHub repository's names
GITHUB_PROMPTS_FILE = "prompts.json"
ITEMS_FILES = (ITEMS_FILE, GITHUB_ITEMS_FILE)
PROMPTS_FILES = (PROMPTS_FILE, GITHUB_PROMPTS_FILE)
FOLDER_PLACES = (".", "singleturn", "Benchmark/singleturn", "Basic", "Benchmark/Basic")
IMAGE_PLACES = (".", "singleturn", "Benchmark/singleturn")  # where the images may sit below --data
PLACEHOLDER = "<edit_prompt>"
REQUIRED_FIELDS = ("id", "prompt", "edit_type")
# The criterion names of each type's answer format in the release's judge_prompt.json (names only: they are how
# an answer line is recognised and how sub-scores are reported).
CRITERIA = {
    "add": ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Coherence"),
    "adjust": ("Prompt Compliance", "Visual Seamlessness", "Physical & Detail Fidelity"),
    "extract": ("Object Identity", "Mask Precision", "Visual Quality"),
    "replace": ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity"),
    "remove": ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity"),
    "background": ("Instruction Compliance", "Visual Seamlessness", "Physical Consistency"),
    "style": ("Style Fidelity", "Content Preservation", "Rendering Quality"),
    "compose": ("Instruction Compliance", "Visual Naturalness", "Physical Consistency & Fine Detail"),
    "action": ("Action Fidelity", "Identity Preservation", "Visual & Anatomical Coherence"),
}


@dataclasses.dataclass(frozen=True)
class Item:
  key: str
  image_id: str  # the release's "id": the image path relative to the folder
  image_path: str  # the folder's path joined with image_id
  instruction: str
  edit_type: str

  @property
  def id(self) -> str:
    return self.key

  @property
  def edited_name(self) -> str:
    return f"{self.key}.png"


def find_file(folder: str | os.PathLike, names: Sequence[str], what: str) -> str:
  """The first of `names` in `folder` or one of its FOLDER_PLACES (place by place); the error names every name and
  place looked at."""
  folder = os.fspath(folder)
  for place in FOLDER_PLACES:
    for name in names:
      path = paths.normpath(paths.join(folder, place, name))
      if paths.isfile(path):
        return path
  raise BenchError(f"{folder}: no ImgEdit {what}: looked for {' or '.join(names)} in "
                   f"{', '.join(p if p == '.' else p + '/' for p in FOLDER_PLACES)} (name the file itself to use "
                   "another)")


def read(folder: str | os.PathLike, items: str | os.PathLike | None = None) -> list[Item]:
  """The Basic suite's items, in the file's order, validated: each entry has "id", "prompt" and a known
  "edit_type", and its image exists inside the image folder (an error names the file, the key and the field).

  `items`: the items file (either layout); default: found in `folder` (`find_file`). Images are looked for where
  the first item's image is: `folder`, its singleturn/ or Benchmark/singleturn/, or the items file's folder."""
  folder = os.fspath(folder)
  path = os.fspath(items) if items is not None else find_file(folder, ITEMS_FILES, "items file")
  if not paths.isfile(path):
    raise BenchError(f"{path}: items file not found")
  data = read_json(path)
  if not isinstance(data, dict) or not data:
    raise BenchError(f"{path}: expected a non-empty JSON object of items keyed by id")
  first = next(iter(data.values()))
  roots = [paths.normpath(paths.join(folder, p)) for p in IMAGE_PLACES] + [paths.dirname(path)]
  root = next((r for r in roots if isinstance(first, dict) and isinstance(first.get("id"), str)
               and paths.isfile(paths.join(r, first["id"]))), paths.dirname(path) if items is None else folder)
  isfile = file_check(root)
  out = []
  for key, entry in data.items():
    where = f"{path}: item {key!r}"
    if not isinstance(entry, dict):
      raise BenchError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in entry]
    if missing:
      raise BenchError(f"{where}: missing field(s) {missing}")
    for f in REQUIRED_FIELDS:
      if not isinstance(entry[f], str) or not entry[f].strip():
        raise BenchError(f"{where}: field {f!r} must be a non-empty string, got {entry[f]!r}")
    edit_type = ALIASES.get(entry["edit_type"], entry["edit_type"])
    if edit_type not in EDIT_TYPES:
      raise BenchError(f"{where}: edit_type {entry['edit_type']!r} is not an ImgEdit type {list(EDIT_TYPES)}")
    image_path = paths.normpath(paths.join(root, entry["id"]))
    if not paths.is_inside(image_path, root):
      raise BenchError(f"{where}: image {entry['id']!r} leaves the benchmark folder")
    if not isfile(image_path):
      raise BenchError(f"{where}: image {image_path} not found")
    out.append(Item(str(key), entry["id"], image_path, entry["prompt"], edit_type))
  return out


@dataclasses.dataclass(frozen=True)
class Prompts:
  """The judge prompt of each edit type, as read from the user's `judge_prompt.json`."""
  by_type: Mapping[str, str]
  source: str = ""

  def prompt(self, edit_type: str, instruction: str) -> str:
    return self.by_type[edit_type].replace(PLACEHOLDER, instruction)


def load_prompts(path: str | os.PathLike) -> Prompts:
  """The judge prompts (`judge_prompt.json` or `prompts.json`; the file, or a folder `find_file` searches): an
  object with a prompt for each of the nine edit types, each holding "<edit_prompt>"; an error names the file and
  the missing or bad key."""
  path = os.fspath(path)
  if not paths.isfile(path):
    path = find_file(path, PROMPTS_FILES, "judge prompts")
  data = read_json(path)
  if not isinstance(data, dict):
    raise BenchError(f"{path}: expected a JSON object {{edit type: prompt}}")
  data = {ALIASES.get(k, k): v for k, v in data.items()}
  missing = [t for t in EDIT_TYPES if t not in data]
  if missing:
    raise BenchError(f"{path}: no prompt for edit type(s) {missing}")
  for t in EDIT_TYPES:
    if not isinstance(data[t], str) or PLACEHOLDER not in data[t]:
      raise BenchError(f"{path}: prompt {t!r} must be a string holding the placeholder {PLACEHOLDER}")
  return Prompts({t: data[t] for t in EDIT_TYPES}, path)


def query(item: Item, prompts: Prompts) -> JudgeQuery:
  """The item's judge call: its type's prompt (instruction filled in), then [source, edited]."""
  return JudgeQuery(item.id, "score", prompts.prompt(item.edit_type, item.instruction), ("source", "edited"), True)


def judge_item(item: Item, text: str) -> ItemResult:
  """The item's result from the judge's answer: the three criteria of its type, each 1..5."""
  parsed = parsing.parse_imgedit(text, CRITERIA[item.edit_type], *SCORE_RANGE)
  return ItemResult(item.id, item.edit_type, "en", {"score": parsed.scores} if parsed.ok else {}, {"score": text},
                    parsed.ok, parsed.reason)


def item_metrics(result: ItemResult) -> dict[str, float]:
  """The item's score: the mean of its sub-scores."""
  values = result.subscores.get("score")
  if not values:
    raise BenchError(f"item {result.id!r}: no 'score' sub-scores")
  return {"score": math.fsum(values) / len(values)}


def summarize(results: Iterable[ItemResult | Mapping], *, categories: Sequence[str] | None = EDIT_TYPES
              ) -> aggregate.Summary:
  """Per edit type the mean item score, and the unweighted mean of the types (None: the types in the results)."""
  return aggregate.summarize(as_results(results), benchmark=BENCHMARK, metrics=METRICS, metric_fn=item_metrics,
                             categories=categories, subset="all", labels=LABELS)
