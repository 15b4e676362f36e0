"""Benchmark runs: the runner on the mini-benchmark with a scripted editor and judge (resume, torn lines,
summaries, gallery, compare), and `launch/evaluate.py` end to end on tiny real models."""

import json
import os
import types

import numpy as np
import pytest

from editr1_jax.bench import base, mini, run

GOOD = {"SC": '{"score": [8, 6], "reasoning": "ok"}', "PQ": '{"score": [9, 7], "reasoning": "ok"}'}


class ScriptedJudge:
  """Answers like a judge would: every third request garbage, the rest well-formed for its benchmark."""

  def __init__(self):
    self.calls = 0

  def answer(self, requests):
    out = []
    for prompt, pictures, text_first in requests:
      self.calls += 1
      assert all(p.mode == "RGB" for p in pictures)
      if "criteria" in prompt.lower() or text_first:  # ImgEdit: its criteria lines
        out.append("Brief reasoning: fine.\n" + "\n".join(f"{c}: 4" for c in _criteria(prompt)))
      else:
        out.append(GOOD["SC"] if len(pictures) == 2 else GOOD["PQ"])
    return out


def _criteria(prompt):
  from editr1_jax.bench import imgedit
  for names in imgedit.CRITERIA.values():
    if all(n in prompt for n in names):
      return names
  return next(iter(imgedit.CRITERIA.values()))


def edit_as_is(sources, instructions, indices):
  return [np.asarray(s.convert("RGB")) for s in sources]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  root = tmp_path_factory.mktemp("mini")
  mini.write(str(root), per_category=1)
  return root


@pytest.mark.parametrize("name,data,prompts", [("gedit", "gedit", "gedit_prompts"),
                                               ("imgedit", "imgedit", None)])
def test_runner_resumes_and_reports(bench, tmp_path, name, data, prompts):
  task = run.make_task(name, str(bench / data), str(bench / prompts) if prompts else None)
  out = tmp_path / "out"
  edits = str(out / run.EDITS)
  assert run.sample_edits(task, edit_as_is, edits, batch_size=2) == len(task.items)
  assert run.sample_edits(task, edit_as_is, edits) == 0  # resumed: nothing sampled twice
  judge = ScriptedJudge()
  results_path = str(out / run.RESULTS)
  results = run.judge_items(task, judge, edits, results_path, batch_size=3)
  assert len(results) == len(task.items) and all(r.parsed for r in results.values())
  report = run.write_summary(task, results.values(), str(out))
  # a kill mid-line: the torn last line is dropped and that item judged again, the summary is the same
  with open(results_path, "r+", encoding="utf-8") as f:
    text = f.read()
    f.seek(0)
    f.truncate()
    f.write(text[:-20])
  calls = judge.calls
  again = run.judge_items(task, judge, edits, results_path)
  assert judge.calls - calls == len(task.queries(task.items[-1]))
  assert run.write_summary(task, again.values(), str(out)) == report
  summary = next(iter(report["summaries"].values()))
  if name == "gedit":
    assert summary["overall"]["O"] == pytest.approx(np.sqrt(6 * 7))  # SC = min(8, 6), PQ = min(9, 7)
  else:
    assert summary["overall"]["score"] == pytest.approx(4.0)
  assert os.path.isfile(out / "summary.md")
  gallery = run.write_gallery(task, again, str(out), str(out))
  assert gallery and all(os.path.isfile(p) for p in gallery)
  compared = run.write_summary(task, again.values(), str(out), str(out))
  assert "compare" in compared


def test_missing_edits_are_named(bench, tmp_path):
  task = run.make_task("imgedit", str(bench / "imgedit"))
  with pytest.raises(run.BenchError, match="edit\\(s\\) missing"):
    run.judge_items(task, ScriptedJudge(), str(tmp_path / "none"), str(tmp_path / run.RESULTS))


def test_reading_another_run_never_rewrites_it(bench, tmp_path):
  """--compare reads the other run's results.jsonl: even with a torn last line it is left as it is."""
  task = run.make_task("imgedit", str(bench / "imgedit"))
  edits = str(tmp_path / run.EDITS)
  run.sample_edits(task, edit_as_is, edits)
  path = str(tmp_path / run.RESULTS)
  run.judge_items(task, ScriptedJudge(), edits, path)
  torn = open(path, encoding="utf-8").read()[:-10]
  open(path, "w", encoding="utf-8").write(torn)
  assert len(run.read_done(path)) == len(task.items) - 1
  assert open(path, encoding="utf-8").read() == torn


class ConstantScorer:
  """Our reward's interface (`MllmJudge.score`): every pair valid, reward 0.5."""

  def score(self, sources, edits, instructions, requirements):
    return types.SimpleNamespace(scores=[0.5] * len(sources), valid=[True] * len(sources))


def test_runner_writes_into_a_bucket_and_resumes(bench, gcs):
  """OUT in a bucket: edits, results.jsonl, reward.jsonl, summaries and the gallery are objects there; a second
  run samples, judges and scores nothing again and reports the same."""
  from editr1_jax import paths
  task = run.make_task("imgedit", gcs.upload(str(bench / "imgedit")))
  out = gcs.url("out")
  edits = paths.join(out, run.EDITS)
  assert run.sample_edits(task, edit_as_is, edits, batch_size=4) == len(task.items)
  assert run.sample_edits(task, edit_as_is, edits) == 0
  judge = ScriptedJudge()
  results = run.judge_items(task, judge, edits, paths.join(out, run.RESULTS), batch_size=4)
  rows = run.reward_items(task, ConstantScorer(), edits, paths.join(out, run.REWARD), batch_size=4)
  report = run.write_summary(task, results.values(), out, out, run.reward_summary(rows.values()))
  gallery = run.write_gallery(task, results, out, out)
  calls = judge.calls
  assert run.judge_items(task, judge, edits, paths.join(out, run.RESULTS)) == results and judge.calls == calls
  assert run.reward_items(task, None, edits, paths.join(out, run.REWARD)) == rows
  assert [r.id for r in base.read_results(paths.join(out, run.RESULTS))] == [i.id for i in task.items]
  assert json.loads(paths.read_text(paths.join(out, "summary.json"))) == report
  assert report["compare"]["other"] == out and report["reward"]["overall"] == 0.5
  assert paths.read_text(paths.join(out, "summary.md")).startswith("# imgedit")
  assert gallery and all(p.startswith(out + "/gallery/") and paths.isfile(p) for p in gallery)
  assert len(paths.walk_files(edits)) == len(task.items)


def test_training_evaluation_checks_the_judge_pixels_before_any_work(bench, tmp_path):
  """One bound set in the config against the judge folder's other one: refused when the evaluation is built (before
  training), naming both fields; a benchmark file error names the benchmark and the file."""
  from configs import tiny as tiny_config
  from editr1_jax import evaluation, tiny
  c = tiny_config.get_config()
  c.eval_benchmark, c.eval_benchmark_dir = "imgedit", str(bench / "imgedit")
  c.eval_judge_dir = os.path.join(tiny.ASSETS, "judge")
  evaluation.BenchmarkEval(c, str(tmp_path))
  c.eval_judge_min_pixels = 10 ** 9
  with pytest.raises(ValueError, match=r"^config.eval_judge_min_pixels / eval_judge_max_pixels: min 1000000000 "
                                       r"exceeds max \d+ \(set, or .*judge's preprocessor_config.json\)"):
    evaluation.BenchmarkEval(c, str(tmp_path))
  c.eval_judge_min_pixels, c.eval_benchmark_items = 0, str(tmp_path / "missing.json")
  with pytest.raises(ValueError, match=r"^config.eval_benchmark \(imgedit\): .*missing.json: items file not found"):
    evaluation.BenchmarkEval(c, str(tmp_path))
