"""One benchmark evaluation, end to end and resumable: edits (sampled with a model family, or read from a
folder of another editor's outputs), the judge's answers, per-item results, summaries and a gallery.

`OUT/edits/<item>.png` and `OUT/results.jsonl` are the state: an edit already on disk is not sampled again,
an item already in results.jsonl is not judged again (a line torn by a kill is dropped and redone), so a
killed evaluation continues where it stopped and ends with the same summary. Edits are all sampled before
the judge is loaded: the editor and the judge are never in memory together. OUT may be a gs:// URL: an object
cannot be appended to, so results.jsonl is rewritten whole (atomically) after each judged batch.
"""

import json
import logging
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
from PIL import Image, ImageDraw

from editr1_jax import images, paths
from editr1_jax.bench import aggregate, gedit, imgedit, interop
from editr1_jax.bench.base import BenchError, ItemResult, JudgeQuery, as_result, file_check, write_results

_LOG = logging.getLogger(__name__)
RESULTS, EDITS, GALLERY = "results.jsonl", "edits", "gallery"


class Task(Protocol):
  """A benchmark as the runner needs it."""

  name: str
  items: list

  def edit_source(self, item) -> Image.Image: ...  # what the editor starts from
  def judge_source(self, item) -> Image.Image: ...  # what the judge compares the edit with
  def queries(self, item) -> Sequence[JudgeQuery]: ...
  def result(self, item, answers: dict) -> ItemResult: ...
  def summaries(self, results) -> dict: ...  # subset name -> aggregate.Summary


class GEditTask:
  """GEdit-Bench: the editor starts from `input_image_raw`, the judge compares with `input_image` (the edit
  resized to its size), two judgments (SC, PQ)."""

  name = "gedit"

  def __init__(self, data: str, prompts: str | None = None, items: str | None = None,
               languages: Sequence[str] | None = None):
    if items is not None:
      raise BenchError(f"items file {items}: GEdit-Bench's items are its data files (--data); only ImgEdit takes one")
    self.release = gedit.read(data)
    self.prompts = gedit.load_prompts(prompts or data)
    self.items = [i for i in self.release.items if languages is None or i.language in languages]

  def edit_source(self, item):
    return self.release.load_image(item, "raw" if "input_image_raw" in self.release.columns[item.file] else "input")

  def judge_source(self, item):
    return self.release.load_image(item, "input")

  def queries(self, item):
    return gedit.queries(item, self.prompts)

  def result(self, item, answers):
    return gedit.judge_item(item, answers["SC"], answers["PQ"])

  def summaries(self, results):  # the tables of the items' languages, judged or not (runs compare key by key)
    found = {i.language for i in self.items}
    return gedit.summaries(results, [l for l in gedit.LANGUAGES if l in found] + sorted(found - set(gedit.LANGUAGES)))

  @staticmethod
  def judged_edit(edited: Image.Image, source: Image.Image) -> Image.Image:
    return gedit.resize_like(edited, source)


class ImgEditTask:
  """ImgEdit Basic: one judgment of three criteria per item, the prompt of its edit type."""

  name = "imgedit"

  def __init__(self, data: str, prompts: str | None = None, items: str | None = None):
    self.items = imgedit.read(data, items)
    if prompts is None and items is not None:  # the GitHub layout: prompts.json beside basic_edit.json, or in --data
      try:
        prompts = imgedit.find_file(data, imgedit.PROMPTS_FILES, "judge prompts")
      except BenchError:
        prompts = paths.dirname(items)
    self.prompts = imgedit.load_prompts(prompts or data)

  def edit_source(self, item):
    return images.load_rgb(item.image_path)

  judge_source = edit_source

  def queries(self, item):
    return (imgedit.query(item, self.prompts),)

  def result(self, item, answers):
    return imgedit.judge_item(item, answers["score"])

  def summaries(self, results):
    return {"all": imgedit.summarize(results)}

  @staticmethod
  def judged_edit(edited: Image.Image, source: Image.Image) -> Image.Image:
    return edited


TASKS = {"gedit": GEditTask, "imgedit": ImgEditTask}


def make_task(benchmark: str, data: str, prompts: str | None = None, items: str | None = None) -> Task:
  if benchmark not in TASKS:
    raise BenchError(f"benchmark {benchmark!r}: expected one of {sorted(TASKS)}")
  return TASKS[benchmark](data, prompts, items)


# ---------------------------------------------------------------------------------------------------------- edits
def edit_path(edits_dir: str, item) -> str:
  return paths.join(edits_dir, item.edited_name)


def save_edit(image: Image.Image, path: str) -> None:
  """An edit written atomically: a kill never leaves half a PNG behind."""
  images.save(image, path)


def sample_edits(task: Task, edit: Callable, edits_dir: str, *, batch_size: int = 1,
                 progress: Callable[[int], None] | None = None) -> int:
  """Writes the missing edits: `edit(sources (PIL list), instructions, indices) -> uint8 images`; items whose
  sources resize to one size go in batches of `batch_size`. Returns how many were sampled."""
  isfile = file_check(edits_dir)
  todo = [(i, item) for i, item in enumerate(task.items) if not isfile(edit_path(edits_dir, item))]
  by_size: dict = {}
  for i, item in todo:
    by_size.setdefault(task.edit_source(item).size, []).append((i, item))
  done = 0
  for group in by_size.values():
    for start in range(0, len(group), batch_size):
      part = group[start:start + batch_size]
      out = edit([task.edit_source(item) for _, item in part], [item.instruction for _, item in part],
                 [i for i, _ in part])
      for (_, item), pixels in zip(part, out):  # each edit saved as it comes: a kill costs at most one batch
        save_edit(Image.fromarray(np.asarray(pixels)), edit_path(edits_dir, item))
      done += len(part)
      if progress:
        progress(len(part))
  return done


# -------------------------------------------------------------------------------------------------------- judging
def read_done(path: str, *, repair: bool = False) -> dict[str, ItemResult]:
  """The results already written. A last line torn by a kill is dropped (that item is judged again); with
  `repair` the file is rewritten without it (atomically) so that new lines can be appended."""
  if not paths.isfile(path):
    return {}
  lines = paths.read_text(path).split("\n")
  done = {}
  for n, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      result = as_result(json.loads(line), where=f"{path}:{n}")
    except (json.JSONDecodeError, BenchError):
      if n < len(lines) - 1:  # only the last line can be torn
        raise BenchError(f"{path}:{n}: not a result line") from None
      _LOG.warning("%s:%d: an unfinished line (a killed run) is dropped; its item is judged again", path, n)
      if repair:
        write_results(path, done.values())
      break
    done[result.id] = result
  return done


class Judge(Protocol):
  def answer(self, requests: Sequence[tuple[str, Sequence[Image.Image], bool]]) -> list[str]:
    """(prompt, images in order, text first?) per request -> the judge's answers."""


def judge_items(task: Task, judge: Judge, edits_dir: str, results_path: str, *, batch_size: int = 1,
                progress: Callable[[int], None] | None = None) -> dict[str, ItemResult]:
  """Judges every item not in `results_path` yet (appending the lines of a batch as soon as it is judged)."""
  done = read_done(results_path, repair=True)
  todo = [item for item in task.items if item.id not in done]
  isfile = file_check(edits_dir)
  missing = [edit_path(edits_dir, i) for i in todo if not isfile(edit_path(edits_dir, i))]
  if missing:
    raise BenchError(f"{edits_dir}: {len(missing)} edit(s) missing, e.g. {missing[:3]}")
  for start in range(0, len(todo), batch_size):
    part = todo[start:start + batch_size]
    requests, owners = [], []
    for item in part:
      source = task.judge_source(item)
      edited = task.judged_edit(images.load_rgb(edit_path(edits_dir, item)), source)
      pictures = {"source": source, "edited": edited}
      for q in task.queries(item):
        requests.append((q.prompt, [pictures[role] for role in q.images], q.text_first))
        owners.append((item, q.judgement))
    answers = judge.answer(requests)
    by_item: dict = {}
    for (item, judgement), text in zip(owners, answers):
      by_item.setdefault(item.id, {})[judgement] = text
    results = [task.result(item, by_item[item.id]) for item in part]
    paths.append_text(results_path, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in results))
    done.update((r.id, r) for r in results)
    if progress:
      progress(len(part))
  return done


# -------------------------------------------------------------------------------------------------------- reports
def read_other(task: Task, path: str) -> dict[str, ItemResult]:
  """Another run's judged items, by id: our OUT folder (its results.jsonl, never rewritten), or the benchmark's
  upstream per-item files (`interop`: GEdit's CSVs, a file or a folder; ImgEdit's result.json, or its folder)."""
  ours = paths.join(path, RESULTS)
  if not paths.isfile(path) and paths.isfile(ours):
    return read_done(ours)
  read = interop.read_gedit(path) if task.name == "gedit" else interop.read_imgedit(path, task.items)
  return {r.id: r for r in read}


def write_summary(task: Task, results: Iterable[ItemResult], out: str, compare_out: str | None = None,
                  reward: dict | None = None, settings: dict | None = None) -> dict:
  """OUT/summary.json and OUT/summary.md (with another run's results, `read_other`: both and the deltas; with
  `reward`, our reward's `reward_summary` beside the judge's scores; `settings`: how the edits were made and
  judged)."""
  summaries = task.summaries(list(results))
  report = {"benchmark": task.name, "summaries": {k: s.to_dict() for k, s in summaries.items()}}
  if settings is not None:
    report["settings"] = settings
  md = [f"# {task.name}", "", aggregate.to_markdown(summaries)]
  if compare_out:
    other = task.summaries(list(read_other(task, compare_out).values()))
    comparison = aggregate.compare(other, summaries)
    report["compare"] = {"other": paths.absolute(compare_out), **{k: c.to_dict() for k, c in comparison.items()}}
    md += ["", f"## against {compare_out}", "", aggregate.comparison_markdown(comparison, names=("other", "this"))]
  if reward is not None:
    report["reward"] = reward
    rows = [f"| {c} | {s['n']} | {s['invalid']} | {_fmt(s['mean'])} |" for c, s in reward["categories"].items()]
    md += ["", "## our reward (logit-expectation score), mean per category", "", "| category | n | invalid | reward |",
           "|---|---|---|---|", *rows, f"| overall | | | {_fmt(reward['overall'])} |"]
  paths.write_text(paths.join(out, "summary.json"), json.dumps(report, indent=2, ensure_ascii=False))
  paths.write_text(paths.join(out, "summary.md"), "\n".join(md) + "\n")
  return report


def _fmt(value: float | None) -> str:
  return "-" if value is None else f"{value:.4f}"


def _score_line(result: ItemResult | None) -> str:
  if result is None:
    return "not judged"
  if not result.parsed:
    return "unparseable"
  return " ".join(f"{k} {'/'.join(f'{v:g}' for v in vals)}" for k, vals in result.subscores.items())


def write_gallery(task: Task, results: dict, out: str, compare_out: str | None = None, *, per_category: int = 8,
                  side: int = 192) -> list[str]:
  """OUT/gallery/<category>.png: rows of source | this run's edit | the other run's edit (where it has its edits
  folder as OUT has; else blank), each with its scores."""
  other = read_other(task, compare_out) if compare_out else {}
  runs = [(paths.join(out, EDITS), results)] + ([(paths.join(compare_out, EDITS), other)] if compare_out else [])
  present = [file_check(edits) for edits, _ in runs]
  by_category: dict = {}
  for item in task.items:
    by_category.setdefault(_category(item), []).append(item)
  written = []
  for category, items in by_category.items():
    items = items[:per_category]
    label = 14
    grid = Image.new("RGB", ((1 + len(runs)) * side, len(items) * (side + label)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, item in enumerate(items):
      y = r * (side + label)
      cells = [("source", task.judge_source(item))]
      for (edits, run_results), isfile in zip(runs, present):
        path = edit_path(edits, item)
        picture = images.load_rgb(path) if isfile(path) else Image.new("RGB", (side, side))
        cells.append((_score_line(run_results.get(item.id)), picture))
      for c, (caption, picture) in enumerate(cells):
        grid.paste(picture.resize((side, side)), (c * side, y + label))
        draw.text((c * side + 2, y), caption[:40], fill=(0, 0, 0))
    path = paths.join(out, GALLERY, f"{category.replace('/', '_')}.png")
    images.save(grid, path)
    written.append(path)
  return written


# ------------------------------------------------------------------------------------------- our reward beside it
REWARD = "reward.jsonl"


def reward_items(task: Task, judge, edits_dir: str, path: str, *, batch_size: int = 8) -> dict[str, dict]:
  """Our training reward (the logit-expectation score of `reward.mllm.MllmJudge`, requirement left empty) of every
  item not in `path` yet, one JSON line per item: {"id", "category", "reward", "valid"}."""
  done = {}
  if paths.isfile(path):
    for line in paths.read_text(path).split("\n"):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a torn last line (or the empty one after the last newline): scored again
        continue
      done[row["id"]] = row
  todo = [item for item in task.items if item.id not in done]
  for start in range(0, len(todo), batch_size):
    part = todo[start:start + batch_size]
    sources = [task.judge_source(item) for item in part]
    edits = [task.judged_edit(images.load_rgb(edit_path(edits_dir, item)), s) for item, s in zip(part, sources)]
    scored = judge.score([np.asarray(s) for s in sources], [np.asarray(e) for e in edits],
                         [item.instruction for item in part], [""] * len(part))
    rows = [{"id": item.id, "category": _category(item), "reward": float(score) if valid else None,
             "valid": bool(valid)} for item, score, valid in zip(part, scored.scores, scored.valid)]
    paths.append_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    done.update((row["id"], row) for row in rows)
  return done


def _category(item) -> str:
  return getattr(item, "task_type", None) or item.edit_type


def reward_summary(rows: Iterable[dict]) -> dict:
  """Per category the mean valid reward and the invalid count; the overall as the benchmarks average (categories)."""
  by: dict = {}
  for row in rows:
    by.setdefault(row["category"], []).append(row)
  cats = {c: {"n": len(r), "invalid": sum(not x["valid"] for x in r),
              "mean": float(np.mean([x["reward"] for x in r if x["valid"]])) if any(x["valid"] for x in r) else None}
          for c, r in sorted(by.items())}
  means = [c["mean"] for c in cats.values()]
  return {"categories": cats, "overall": None if not means or None in means else float(np.mean(means))}
