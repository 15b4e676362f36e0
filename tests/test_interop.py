"""Judged items in the benchmarks' own per-item formats: GEdit-Bench's CSVs aggregated as upstream's
`calculate_statistics.py` does (re-implemented here from its arithmetic, not its code), ImgEdit's result.json as its
step 1 / step 2 scripts read it, exact round trips, and --compare against such files."""

import csv
import json
import math
import os

import numpy as np
import pytest

from editr1_jax.bench import BenchError, gedit, imgedit, interop, mini, run

# np.mean (pairwise sums) against our math.fsum over at most 4 items of values <= 10: both within a few ulps of the
# exact mean; 1e-12 relative is far above that and far below any real difference (scores move in steps of 1/n).
REL = 1e-12


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  return mini.write(tmp_path_factory.mktemp("mini"), per_category=2, seed=3)


def _gedit_results(bench, seed=0):
  """Every item judged with random scores; some answers outside the intersection unreadable (every task type and
  language keeps a scored item in both tables, so upstream's means are numbers, not NaN)."""
  rng = np.random.default_rng(seed)
  items = gedit.read(bench.gedit).items
  results = []
  for n, item in enumerate(items):
    sc, pq = rng.integers(0, 11, 2), rng.integers(0, 11, 2)
    readable = json.dumps({"score": sc.tolist(), "reasoning": "r"})
    sc_text = "no idea" if n % 3 == 0 and not item.intersection else readable
    results.append(gedit.judge_item(item, sc_text, json.dumps({"score": pq.tolist(), "reasoning": "r"})))
  return items, results


def _upstream_gedit(folder, language, intersection):
  """calculate_statistics.py's arithmetic: per task type the mean over its rows of the language (and of the
  Intersection_exist rows), O = sqrt(SC * PQ) per row; then the mean of the 11 task-type means."""
  per_type = {}
  for task_type in gedit.TASK_TYPES:
    name = os.path.join(folder, interop.GEDIT_BACKBONE, "eval_results_new", f"m_{task_type}_gpt_score.csv")
    with open(name, newline="", encoding="utf-8") as f:
      rows = [r for r in csv.DictReader(f) if r["instruction_language"] == language
              and (not intersection or r["intersection_exist"] == "True")]
    s = [float(r["sementics_score"]) for r in rows]
    q = [float(r["quality_score"]) for r in rows]
    per_type[task_type] = (np.mean(s), np.mean(q), np.mean([math.sqrt(a * b) for a, b in zip(s, q)]))
  return [np.mean([v[i] for v in per_type.values()]) for i in range(3)], per_type


def test_gedit_csvs_aggregate_as_upstream_and_read_back_exactly(bench, tmp_path):
  items, results = _gedit_results(bench)
  out = str(tmp_path / "out")
  files = interop.write_gedit(results, items, out, "m", str(tmp_path / "out" / "edits"))
  assert len(files) == 11 and all(os.path.basename(f).startswith("m_") for f in files)
  with open(files[0], newline="", encoding="utf-8") as f:
    assert tuple(csv.DictReader(f).fieldnames) == interop.GEDIT_COLUMNS
  ours = gedit.summaries(results)
  for language in ("en", "cn"):
    for intersection in (False, True):
      overall, per_type = _upstream_gedit(interop.gedit_folder(out, "m"), language, intersection)
      table = ours[f"{language}_intersection" if intersection else language]
      assert [table.overall[m] for m in ("SC", "PQ", "O")] == pytest.approx(overall, rel=REL)
      for task_type, means in per_type.items():
        assert [table.categories[task_type].means[m] for m in ("SC", "PQ", "O")] == pytest.approx(means, rel=REL)
  # Back in: every parsed item, with its SC and PQ; the unreadable ones have no row (upstream drops them too).
  back = interop.read_gedit(interop.gedit_folder(out, "m"))
  parsed = [r for r in results if r.parsed]
  assert len(back) == len(parsed) < len(results)
  assert gedit.summaries(back) == gedit.summaries(parsed)  # exact: the same numbers, summed with fsum
  assert {r.id: r.subsets for r in back} == {r.id: r.subsets for r in parsed}


def test_gedit_csvs_of_one_model_are_read(bench, tmp_path):
  """Upstream's folder also holds `<model>_combined_gpt_score.csv` (never read) and, in some versions, every model's
  CSVs: several models are an error naming them, `<folder>/<model>` picks one."""
  items, results = _gedit_results(bench)
  out = str(tmp_path / "out")
  files = interop.write_gedit(results, items, out, "m", str(tmp_path / "edits"))
  folder = os.path.dirname(files[0])
  combined = os.path.join(folder, "m_combined_gpt_score.csv")
  with open(combined, "w", encoding="utf-8") as f:
    f.write("".join(open(p, encoding="utf-8").read() for p in files))
  parsed = gedit.summaries([r for r in results if r.parsed])
  assert gedit.summaries(interop.read_gedit(folder)) == parsed
  for p in files[:2]:  # another model's files beside them
    os.link(p, os.path.join(folder, os.path.basename(p).replace("m_", "other_model_", 1)))
  with pytest.raises(BenchError, match=r"CSVs of 2 models \(m, other_model\): name one as .*/m$"):
    interop.read_gedit(folder)
  assert gedit.summaries(interop.read_gedit(os.path.join(folder, "m"))) == parsed
  assert len(interop.gedit_csv_files(os.path.join(folder, "other_model"))) == 2


def test_gedit_csv_errors_name_the_row(tmp_path):
  path = tmp_path / "m_color_alter_gpt_score.csv"
  header = ",".join(interop.GEDIT_COLUMNS)
  path.write_text(header + "\nsrc,x/color_alter/en/k.png,do,7,eight,True,en\n")
  with pytest.raises(BenchError, match=r"m_color_alter_gpt_score\.csv:2: sementics_score / quality_score"):
    interop.read_gedit(str(tmp_path))
  path.write_text(header + "\nsrc,x/color_alter/en/k.png,do,7,8,,en\n")  # an empty flag is not False
  with pytest.raises(BenchError, match=r":2: intersection_exist '' is not a boolean"):
    interop.read_gedit(str(path))
  path.write_text(header + "\nsrc,k.png,do,7,8,True,en\n")
  with pytest.raises(BenchError, match=r":2: edited_image 'k\.png' is not <task type>/<language>/<key>\.png"):
    interop.read_gedit(str(path))
  path.write_text("a,b\n1,2\n")
  with pytest.raises(BenchError, match=r"missing column\(s\)"):
    interop.read_gedit(str(path))
  with pytest.raises(BenchError, match="no GEdit-Bench result CSV"):
    interop.read_gedit(str(tmp_path / "nothing"))


def _imgedit_results(bench):
  items = imgedit.read(bench.imgedit)
  rng = np.random.default_rng(1)
  results = []
  for n, item in enumerate(items):
    lines = [f"{c}: {int(rng.integers(1, 6))}" for c in imgedit.CRITERIA[item.edit_type]]
    text = "Brief reasoning: r\n" + "\n".join(lines if n % 5 != 2 else lines[:1])
    results.append(imgedit.judge_item(item, text))
  return items, results


def test_imgedit_result_json_round_trip_and_upstream_steps(bench, tmp_path):
  items, results = _imgedit_results(bench)
  path = interop.write_imgedit(results, str(tmp_path / "result.json"))
  answers = json.loads(open(path, encoding="utf-8").read())
  assert list(answers) == [i.key for i in items]
  back = interop.read_imgedit(str(tmp_path), items)
  assert back == results  # the same answers parsed the same way, unreadable ones included
  # Upstream's step 1 (the mean of the "name: digit" lines, 2 decimals) and step 2 (each type's mean, 2 decimals)
  # on the file we wrote: our unrounded type means lie within the two roundings (0.005 each) of theirs, over the
  # items both read (ours refuses the answers with one criterion line; step 1 reads any such line).
  step1 = {}
  for key, text in answers.items():
    scores = [int(p[1]) for p in (line.strip().split(": ") for line in text.splitlines())
              if len(p) == 2 and p[1].isdigit()]
    step1[key] = round(sum(scores) / len(scores), 2)
  readable = [r for r in results if r.parsed]
  step1 = {k: v for k, v in step1.items() if k in {r.id for r in readable}}
  types = {i.key: i.edit_type for i in items}
  step2 = {t: round(float(np.mean([v for k, v in step1.items() if types[k] == t])), 2)
           for t in imgedit.EDIT_TYPES}
  ours = imgedit.summarize(readable)
  for t in imgedit.EDIT_TYPES:
    assert abs(ours.categories[t].means["score"] - step2[t]) <= 0.01 + 1e-12
  with pytest.raises(BenchError, match="key 'nope' is not an item"):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "result.json").write_text(json.dumps({"nope": "x"}))
    interop.read_imgedit(str(tmp_path / "bad"), items)


@pytest.mark.parametrize("name", ["gedit", "imgedit"])
def test_compare_reads_upstream_files(bench, tmp_path, name):
  """--compare with upstream per-item files (ours exported, as a published model's would be): the comparison is
  the one against our own run folder wherever both hold the same items."""
  task = run.make_task(name, bench.gedit if name == "gedit" else bench.imgedit,
                       bench.gedit_prompts if name == "gedit" else None)
  items, results = _gedit_results(bench) if name == "gedit" else _imgedit_results(bench)
  if name == "gedit":  # upstream keeps no unreadable items: compare like with like
    results = [r for r in results if r.parsed]
  out = str(tmp_path / "out")
  os.makedirs(out)
  from editr1_jax.bench.base import write_results
  write_results(os.path.join(out, run.RESULTS), results)
  files = interop.write(name, results, items, out, model="m", edits_dir=os.path.join(out, run.EDITS))
  exported = interop.gedit_folder(out, "m") if name == "gedit" else files[0]
  against_files = run.write_summary(task, results, str(tmp_path / "a"), exported)["compare"]
  against_run = run.write_summary(task, results, str(tmp_path / "b"), out)["compare"]
  assert {k: v for k, v in against_files.items() if k != "other"} == \
      {k: v for k, v in against_run.items() if k != "other"}
  deltas = [d["delta"] for c in against_files.values() if isinstance(c, dict) and "overall" in c
            for d in c["overall"].values()]
  assert deltas and all(d == 0 for d in deltas if d is not None)
