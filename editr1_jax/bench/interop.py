"""Judged items in each benchmark's own per-item format, both ways, so results travel: ours handed to the upstream
scoring scripts, and a published model's per-item results read in to compare with ours.

- GEdit-Bench (Step1X-Edit's `test_gedit_score.py` writes them, `calculate_statistics.py` reads them): one CSV per
  model and task type, `.../<backbone>/eval_results_new/<model>_<task type>_gpt_score.csv` (under `<save_path>` in
  the scripts with a fixed model name, under `<save_path>/<model>` in those taking `--model_name`), both languages
  in one file (beside them upstream's `<model>_combined_gpt_score.csv`, which is not read), the columns
  `source_image, edited_image, instruction, sementics_score` (sic), `quality_score, intersection_exist,
  instruction_language`; the two scores are VIEScore's SC and PQ (each the min of its answer's
  two numbers). An unparseable item has no scores: like upstream (which drops an item its judge call failed on) it
  gets no row; our own summary counts it.
- ImgEdit (its `basic_bench.py` writes, `step1_get_avgscore.py` reads): `result.json`, {key: the judge's answer}.

Reading back is exact: a GEdit row gives an item whose SC and PQ are the row's, an ImgEdit answer is parsed as our
judge's answers are (an answer our parser cannot read is counted unparseable, never guessed).
"""

import csv
import io
import json

from editr1_jax import paths
from editr1_jax.bench import gedit, imgedit
from editr1_jax.bench.base import BenchError, ItemResult, as_results, read_json

GEDIT_COLUMNS = ("source_image", "edited_image", "instruction", "sementics_score", "quality_score",
                 "intersection_exist", "instruction_language")
GEDIT_BACKBONE = "qwen25vl"  # calculate_statistics.py's --backbone for a Qwen2.5-VL judge
GEDIT_SUFFIX = "_gpt_score.csv"
IMGEDIT_RESULT = "result.json"
UPSTREAM = "upstream"  # OUT/upstream/: what `write` puts there


def gedit_folder(out: str, model: str) -> str:
  """Where our CSVs go in OUT: `OUT/upstream/gedit/<model>`, upstream's `--save_path` for its scripts with a fixed
  model name (`OUT/upstream/gedit` with `--model_name=<model>` for the others)."""
  return paths.join(out, UPSTREAM, "gedit", model)


def write_gedit(results, items, out: str, model: str, edits_dir: str) -> list[str]:
  """One CSV per task type under `gedit_folder(out, model)/qwen25vl/eval_results_new/`, every task type of the
  benchmark (a header only where none was judged); `edited_image` is our edit, `source_image` the `<key>_SRCIMG.png`
  beside it that GEdit's own layout names (the judge's source picture is not copied there). Returns the files."""
  by_id = {r.id: r for r in as_results(results)}
  rows = {task_type: [] for task_type in gedit.TASK_TYPES}
  for item in items:
    result = by_id.get(item.id)
    if result is None or not result.parsed:
      continue
    metrics = gedit.item_metrics(result)
    edited = paths.join(edits_dir, item.edited_name)
    rows[item.task_type].append({"source_image": edited[:-len(".png")] + "_SRCIMG.png", "edited_image": edited,
                                 "instruction": item.instruction, "sementics_score": repr(metrics["SC"]),
                                 "quality_score": repr(metrics["PQ"]), "intersection_exist": bool(item.intersection),
                                 "instruction_language": item.language})
  folder = paths.join(gedit_folder(out, model), GEDIT_BACKBONE, "eval_results_new")
  written = []
  for task_type, task_rows in rows.items():
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=GEDIT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(task_rows)
    path = paths.join(folder, f"{model}_{task_type}{GEDIT_SUFFIX}")
    paths.write_text(path, buffer.getvalue())
    written.append(path)
  return written


def _csv_model(name: str) -> str | None:
  """`<model>` of a per-task-type file name `<model>_<task type>_gpt_score.csv`; None for any other name."""
  stem = name[:-len(GEDIT_SUFFIX)] if name.endswith(GEDIT_SUFFIX) else ""
  task_type = next((t for t in gedit.TASK_TYPES if stem.endswith("_" + t)), None)
  return stem[:-len(task_type) - 1] if task_type else None


def gedit_csv_files(path: str) -> list[str]:
  """One model's per-task-type CSVs: a file; every such file below a folder (one model's only: several are an error
  naming them); or `<folder>/<model>`, that model's files in the folder."""
  if paths.isfile(path):
    return [path]
  if paths.isdir(path):
    files = [p for p in paths.glob(path, GEDIT_SUFFIX) if _csv_model(paths.basename(p)) is not None]
    models = sorted({_csv_model(paths.basename(p)) for p in files})
    if len(models) > 1:
      raise BenchError(f"{path}: GEdit-Bench result CSVs of {len(models)} models ({', '.join(models)}): name one as "
                       f"{paths.join(path, models[0])}")
    return files
  folder, model = paths.dirname(path), paths.basename(path)
  if not paths.isdir(folder):
    return []
  return [p for p in paths.glob(folder, GEDIT_SUFFIX)
          if paths.normpath(paths.dirname(p)) == paths.normpath(folder) and _csv_model(paths.basename(p)) == model]


def _truth(value: str, where: str) -> bool:
  text = value.strip().lower()
  if text in ("true", "1"):
    return True
  if text in ("false", "0"):
    return False
  raise BenchError(f"{where}: intersection_exist {value!r} is not a boolean")


def read_gedit(path: str) -> list[ItemResult]:
  """Items from one model's upstream CSVs (`gedit_csv_files`): the id from the edited image's path (`<task
  type>/<language>/<key>.png`, as GEdit lays edits out), SC and PQ from the row; an error names the file, the row
  and the column."""
  files = gedit_csv_files(path)
  if not files:
    raise BenchError(f"{path}: no GEdit-Bench result CSV (<model>_<task type>{GEDIT_SUFFIX})")
  out = []
  for file in files:
    reader = csv.DictReader(io.StringIO(paths.read_text(file)))
    missing = [c for c in GEDIT_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise BenchError(f"{file}: missing column(s) {missing}")
    for n, row in enumerate(reader, start=2):
      where = f"{file}:{n}"
      parts = row["edited_image"].replace("\\", "/").split("/")
      if len(parts) < 3 or not parts[-1].endswith(".png") or parts[-3] not in gedit.TASK_TYPES:
        raise BenchError(f"{where}: edited_image {row['edited_image']!r} is not <task type>/<language>/<key>.png")
      task_type, language, key = parts[-3], parts[-2], parts[-1][:-len(".png")]
      if language != row["instruction_language"]:
        raise BenchError(f"{where}: edited_image says language {language!r}, instruction_language "
                         f"{row['instruction_language']!r}")
      try:
        sc, pq = float(row["sementics_score"]), float(row["quality_score"])
      except ValueError as e:
        raise BenchError(f"{where}: sementics_score / quality_score must be numbers ({e})") from None
      subsets = (gedit.INTERSECTION,) if _truth(row["intersection_exist"], where) else ()
      out.append(ItemResult(f"{task_type}/{language}/{key}", task_type, language, {"SC": (sc,), "PQ": (pq,)}, {},
                            True, "", subsets))
  return as_results(out)


def imgedit_file(out: str) -> str:
  """Where `write` puts ImgEdit's per-item answers: `OUT/upstream/imgedit/result.json`."""
  return paths.join(out, UPSTREAM, "imgedit", IMGEDIT_RESULT)


def write_imgedit(results, path: str) -> str:
  """`result.json`: every judged item's answer by key (unparseable ones too: upstream's step 1 drops what it cannot
  read)."""
  answers = {r.id: r.raw["score"] for r in as_results(results)}
  paths.write_text(path, json.dumps(answers, indent=4, ensure_ascii=False))
  return path


def read_imgedit(path: str, items) -> list[ItemResult]:
  """Items from a `result.json` (the file, or a folder holding it), each answer parsed against its item's edit
  type; a key that is not one of `items` is an error naming it."""
  if not paths.isfile(path):
    path = paths.join(path, IMGEDIT_RESULT)
  if not paths.isfile(path):
    raise BenchError(f"{path}: ImgEdit results file not found")
  answers = read_json(path)
  if not isinstance(answers, dict):
    raise BenchError(f"{path}: expected a JSON object {{key: answer}}")
  by_key = {item.key: item for item in items}
  out = []
  for key, text in answers.items():
    if key not in by_key:
      raise BenchError(f"{path}: key {key!r} is not an item of this benchmark's items file")
    if not isinstance(text, str):  # upstream writes {"error": ...} for a failed call
      text = json.dumps(text, ensure_ascii=False)
    out.append(imgedit.judge_item(by_key[key], text))
  return out


def write(benchmark: str, results, items, out: str, *, model: str, edits_dir: str) -> list[str]:
  """The upstream per-item files of a run, under OUT/upstream/."""
  if benchmark == "gedit":
    return write_gedit(results, items, out, model, edits_dir)
  by_id = {r.id: r for r in as_results(results)}
  return [write_imgedit([by_id[i.id] for i in items if i.id in by_id], imgedit_file(out))]


def model_name(model: str | None, edits: str | None) -> str:
  """The `<model>` of upstream's file names: the editor's folder name (or the edits folder's)."""
  return paths.basename((model or edits or "").rstrip("/")) or "model"
