"""Benchmark runs: the runner on the mini-benchmark with a scripted editor and judge (resume, torn lines,
summaries, gallery, compare), and `launch/evaluate.py` end to end on tiny real models."""

import os

import numpy as np
import pytest

from editr1_jax.bench import mini, run

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
