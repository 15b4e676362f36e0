"""The benchmark protocols (editr1_jax.bench): release readers on the mini-benchmark and their refusals, the
prompt loaders, the judge queries, parsing of realistic judge answers, aggregation against scores computed by
hand (unparseable items counted, never scored), the Markdown tables and `compare`."""

import dataclasses
import json
import math
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from editr1_jax.bench import BenchError, aggregate, base, gedit, imgedit, mini, parsing, run


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  return mini.write(tmp_path_factory.mktemp("mini"), per_category=2, seed=0)


def viescore(a, b):
  return f'{{\n"score" : [{a}, {b}],\n"reasoning" : "fine"\n}}'


# ------------------------------------------------------------------------------------------------------ readers


def test_gedit_reader_on_the_mini_benchmark(bench):
  release = gedit.read(bench.gedit)
  assert release.format == "parquet" and len(release.items) == bench.n_gedit == 11 * 2 * 2
  assert release.languages == ["en", "cn"]
  for language in ("en", "cn"):
    for task in gedit.TASK_TYPES:
      assert sum(i.language == language and i.task_type == task for i in release.items) == 2
  cn = [i for i in release.items if i.language == "cn"]
  assert all(any("\u4e00" <= ch <= "\u9fff" for ch in i.instruction) for i in cn)
  assert len({i.id for i in release.items}) == len(release.items)
  assert {i.intersection for i in release.items} == {True, False}
  item = release.items[7]
  assert item.edited_name == f"{item.task_type}/{item.language}/{item.key}.png"
  source, raw = release.load_image(item), release.load_image(item, "raw")
  assert source.mode == "RGB" and source.size == (64, 48) and raw.size == (96, 72)
  # Reading in any order gives the same bytes as reading in order (row-group cache).
  forward = [release.image_bytes(i) for i in release.items]
  assert [release.image_bytes(i) for i in reversed(release.items)] == forward[::-1]


def test_gedit_reader_reads_the_datasets_arrow_layout(bench, tmp_path):
  arrow = mini.write(tmp_path, per_category=2, seed=0, gedit_format="arrow")
  assert os.path.isfile(os.path.join(arrow.gedit, "train", "data-00000-of-00001.arrow"))
  a, p = gedit.read(arrow.gedit), gedit.read(bench.gedit)
  assert a.format == "arrow"
  assert [(i.id, i.instruction, i.intersection) for i in a.items] == [(i.id, i.instruction, i.intersection)
                                                                      for i in p.items]
  assert a.image_bytes(a.items[9], "raw") == p.image_bytes(p.items[9], "raw")


def _parquet(path, columns: dict):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.table(columns), path)


def _image_column(n):
  png = mini._png(Image.new("RGB", (4, 4)))
  return pa.array([{"bytes": png, "path": None}] * n, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def test_gedit_reader_refuses_other_layouts(tmp_path):
  with pytest.raises(BenchError, match="no GEdit-Bench data files"):
    gedit.read(tmp_path)
  path = str(tmp_path / "a" / "data" / "train.parquet")
  _parquet(path, {"key": ["k"], "task_type": ["color_alter"], "instruction": ["x"]})
  missing = r"train\.parquet: missing column\(s\) \['instruction_language', 'input_image'\]"
  with pytest.raises(BenchError, match=missing):
    gedit.read(tmp_path / "a")
  good = {"key": ["k1", "k2"], "task_type": ["color_alter", "recolour"], "instruction": ["x", "y"],
          "instruction_language": ["en", "en"], "input_image": _image_column(2)}
  _parquet(str(tmp_path / "b" / "t.parquet"), good)
  with pytest.raises(BenchError, match=r"t\.parquet: row 1: task_type 'recolour' is not a GEdit-Bench task type"):
    gedit.read(tmp_path / "b")
  _parquet(str(tmp_path / "c" / "t.parquet"), {**good, "task_type": ["color_alter"] * 2, "key": ["k", "k"]})
  with pytest.raises(BenchError, match=r"row 1: item color_alter/en/k .*also at .*row 0"):
    gedit.read(tmp_path / "c")
  _parquet(str(tmp_path / "d" / "t.parquet"), {**good, "task_type": ["color_alter"] * 2, "input_image": ["a", "b"]})
  with pytest.raises(BenchError, match="column 'input_image' has type string; expected an image"):
    gedit.read(tmp_path / "d")
  _parquet(str(tmp_path / "e" / "t.parquet"), {**good, "task_type": ["color_alter"] * 2, "instruction": ["x", ""]})
  with pytest.raises(BenchError, match="row 1: column 'instruction' must be a non-empty string"):
    gedit.read(tmp_path / "e")
  _parquet(str(tmp_path / "f" / "t.parquet"), {**good, "task_type": ["color_alter"] * 2})
  release = gedit.read(tmp_path / "f")
  with pytest.raises(BenchError, match="no column 'input_image_raw'"):
    release.image_bytes(release.items[0], "raw")
  _parquet(str(tmp_path / "g" / "t.parquet"), {})  # an empty table beside an arrow file: two copies
  (tmp_path / "g" / "x.arrow").write_bytes(b"")
  with pytest.raises(BenchError, match="both .parquet and .arrow"):
    gedit.read(tmp_path / "g")


def test_imgedit_reader_on_the_mini_benchmark(bench):
  items = imgedit.read(bench.imgedit)
  assert len(items) == bench.n_imgedit == 9 * 2
  assert [i.edit_type for i in items[::2]] == list(imgedit.EDIT_TYPES)
  assert all(os.path.isfile(i.image_path) for i in items)
  assert any(" " in i.image_id for i in items)  # "daily object/..." as in the release
  assert items[0].edited_name == f"{items[0].key}.png"
  # The parent folders of singleturn/ are found too.
  assert imgedit.read(os.path.dirname(os.path.dirname(bench.imgedit))) == items


def test_imgedit_reads_both_release_layouts(bench, tmp_path):
  """The GitHub layout (`basic_edit.json` + `prompts.json`, images from the tarball) gives the tarball's items and
  prompts, named on the command line or found in a folder; a folder with neither is refused, naming both names."""
  items, prompts = imgedit.read(bench.imgedit), imgedit.load_prompts(bench.imgedit)
  github_items = os.path.join(bench.imgedit_github, "basic_edit.json")
  assert imgedit.read(bench.imgedit, github_items) == items  # "alter" read as "adjust"
  github = imgedit.load_prompts(bench.imgedit_github)
  assert github.source.endswith("prompts.json") and github.by_type == prompts.by_type
  task = run.make_task("imgedit", bench.imgedit, items=github_items)  # prompts found beside the items file
  assert task.items == items and task.prompts.by_type == prompts.by_type
  # A folder holding the GitHub files and the images: found on their own.
  alone = tmp_path / "github"
  shutil.copytree(bench.imgedit, alone, ignore=shutil.ignore_patterns("*.json"))
  for name in ("basic_edit.json", "prompts.json"):
    shutil.copy(os.path.join(bench.imgedit_github, name), alone / name)
  assert [i.instruction for i in imgedit.read(alone)] == [i.instruction for i in items]
  assert run.make_task("imgedit", str(alone)).prompts.by_type == prompts.by_type
  (tmp_path / "empty").mkdir()
  with pytest.raises(BenchError, match=r"no ImgEdit items file: looked for singleturn\.json or basic_edit\.json in "
                                       r"\., singleturn/, Benchmark/singleturn/, Basic/, Benchmark/Basic/"):
    imgedit.read(tmp_path / "empty")
  with pytest.raises(BenchError, match=r"no ImgEdit judge prompts: looked for judge_prompt\.json or prompts\.json"):
    imgedit.load_prompts(tmp_path / "empty")
  with pytest.raises(BenchError, match="only ImgEdit takes one"):
    run.make_task("gedit", bench.gedit, bench.gedit_prompts, items=github_items)


def _imgedit_folder(tmp_path, entries: dict, image="animal/1.png"):
  root = tmp_path / "singleturn"
  (root / "animal").mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (4, 4)).save(root / image)
  (root / "singleturn.json").write_text(json.dumps(entries))
  return root


def test_imgedit_reader_refuses_other_layouts(tmp_path):
  with pytest.raises(BenchError, match=r"no ImgEdit items file"):
    imgedit.read(tmp_path)
  root = _imgedit_folder(tmp_path, {"7": {"id": "animal/1.png", "prompt": "Add a hat."}})
  with pytest.raises(BenchError, match=r"item '7': missing field\(s\) \['edit_type'\]"):
    imgedit.read(root)
  _imgedit_folder(tmp_path, {"7": {"id": "animal/1.png", "prompt": "Add a hat.", "edit_type": "recolour"}})
  with pytest.raises(BenchError, match="item '7': edit_type 'recolour' is not an ImgEdit type"):
    imgedit.read(root)
  _imgedit_folder(tmp_path, {"7": {"id": "animal/2.png", "prompt": "Add a hat.", "edit_type": "add"}})
  with pytest.raises(BenchError, match=r"item '7': image .*animal/2\.png not found"):
    imgedit.read(root)
  _imgedit_folder(tmp_path, {"7": {"id": "../x.png", "prompt": "Add a hat.", "edit_type": "add"}})
  with pytest.raises(BenchError, match="leaves the benchmark folder"):
    imgedit.read(root)
  (root / "singleturn.json").write_text("{not json")
  with pytest.raises(BenchError, match="malformed JSON"):
    imgedit.read(root)
  _imgedit_folder(tmp_path, {"7": {"id": "animal/1.png", "prompt": "Warm it up.", "edit_type": "alter"}})
  assert imgedit.read(root)[0].edit_type == "adjust"  # the early name of the type


# ------------------------------------------------------------------------------------------------- in a bucket


def _gedit_rows(release):
  return [(i.id, i.instruction, i.intersection, i.row, release.image_bytes(i, "raw")) for i in release.items]


def test_readers_read_a_release_in_a_bucket(bench, gcs):
  """The mini-benchmark copied into a bucket: the same items, images and prompts as from the local folder."""
  from editr1_jax import images, paths
  url = gcs.upload(os.path.dirname(bench.gedit))
  remote = gedit.read(paths.join(url, "gedit"))
  local = gedit.read(bench.gedit)
  assert remote.format == "parquet" and remote.files == [paths.join(url, "gedit/data/train-00000-of-00001.parquet")]
  assert _gedit_rows(remote) == _gedit_rows(local)
  remote_prompts = gedit.load_prompts(paths.join(url, "gedit_prompts"))
  local_prompts = gedit.load_prompts(bench.gedit_prompts)
  assert remote_prompts.source == paths.join(url, "gedit_prompts", "viescore", "vie_prompts.py")
  assert dataclasses.replace(remote_prompts, source="") == dataclasses.replace(local_prompts, source="")
  items = imgedit.read(paths.join(url, "imgedit"))  # the singleturn folder found below, as locally
  assert [dataclasses.replace(i, image_path="") for i in items] == [
      dataclasses.replace(i, image_path="") for i in imgedit.read(bench.imgedit)]
  assert items[3].image_path == paths.join(url, "imgedit/Benchmark/singleturn", items[3].image_id)
  assert images.load_rgb(items[3].image_path).tobytes() == images.load_rgb(
      os.path.join(bench.imgedit, items[3].image_id)).tobytes()
  assert imgedit.load_prompts(paths.join(url, "imgedit")).by_type == imgedit.load_prompts(bench.imgedit).by_type


def test_mini_benchmark_written_into_a_bucket(gcs, tmp_path):
  """`mini.write` into a bucket (the Arrow layout, raw prompt files) reads back as the local copy does."""
  url = mini.write(gcs.url("mini"), per_category=1, gedit_format="arrow", gedit_prompts="raw")
  here = mini.write(tmp_path, per_category=1, gedit_format="arrow", gedit_prompts="raw")
  remote, local = gedit.read(url.gedit), gedit.read(here.gedit)
  assert remote.format == "arrow" and _gedit_rows(remote) == _gedit_rows(local)
  assert gedit.load_prompts(url.gedit_prompts).sc_rule == gedit.load_prompts(here.gedit_prompts).sc_rule
  assert [i.instruction for i in imgedit.read(url.imgedit)] == [i.instruction for i in imgedit.read(here.imgedit)]
  with pytest.raises(BenchError, match=r"gs://editr1-test/.*/none: GEdit-Bench folder not found"):
    gedit.read(gcs.url("none"))
  with pytest.raises(BenchError, match=r"gs://editr1-test/.*/none: no ImgEdit items file"):
    imgedit.read(gcs.url("none"))


# ------------------------------------------------------------------------------------------- prompts and queries


def test_gedit_prompts_from_either_layout_and_the_queries(bench, tmp_path):
  prompts = gedit.load_prompts(bench.gedit_prompts)
  assert prompts.source.endswith(os.path.join("viescore", "vie_prompts.py"))
  raw = gedit.load_prompts(mini.write(tmp_path, per_category=1, gedit_prompts="raw").gedit_prompts)
  assert (raw.context, raw.edit_rule, raw.sc_rule, raw.pq_rule) == (
      prompts.context, prompts.edit_rule, prompts.sc_rule, prompts.pq_rule)
  item = gedit.read(bench.gedit).items[1]
  sc, pq_query = gedit.queries(item, prompts)
  assert sc.prompt == "\n".join([prompts.context, prompts.edit_rule, prompts.sc_rule]).replace(
      "<instruction>", item.instruction)
  assert item.instruction in sc.prompt and "<instruction>" not in sc.prompt
  assert (sc.judgement, sc.images, sc.text_first) == ("SC", ("source", "edited"), False)
  assert pq_query.prompt == prompts.context + "\n" + prompts.pq_rule
  assert (pq_query.judgement, pq_query.images) == ("PQ", ("edited",))


def test_gedit_prompt_loader_names_what_is_missing(tmp_path):
  with pytest.raises(BenchError, match="no VIEScore prompts: expected one of"):
    gedit.load_prompts(tmp_path)
  module = tmp_path / "viescore" / "vie_prompts.py"
  module.parent.mkdir()
  module.write_text('_context_no_delimit = "c"\n_prompts_0shot_tie_rule_SC = "s <instruction>"\n'
                    '_prompts_0shot_rule_PQ = "p"\nimport os\nos.remove("never run")\n')
  with pytest.raises(BenchError, match=r"vie_prompts\.py: missing prompt variable\(s\) "
                                       r"\['_prompts_0shot_two_image_edit_rule'\]"):
    gedit.load_prompts(tmp_path)
  module.write_text(module.read_text() + '_prompts_0shot_two_image_edit_rule = "e"\n')
  assert gedit.load_prompts(tmp_path).sc_prompt("X") == "c\ne\ns X"  # read as data, never executed
  module.write_text(module.read_text().replace("<instruction>", ""))
  with pytest.raises(BenchError, match="has no <instruction> placeholder"):
    gedit.load_prompts(tmp_path)
  raw = tmp_path / "r" / "prompts_raw"
  (raw / "prompts_0shot").mkdir(parents=True)
  for rel in ("context_no_delimit.txt", "prompts_0shot/two_image_edit_rule.txt", "prompts_0shot/tie_rule_SC.txt"):
    (raw / rel).write_text("<instruction>")
  with pytest.raises(BenchError, match=r"prompts_0shot/rule_PQ\.txt: prompt file not found"):
    gedit.load_prompts(tmp_path / "r")


def test_imgedit_prompts_and_query(bench, tmp_path):
  prompts = imgedit.load_prompts(bench.imgedit)
  assert prompts.source.endswith("judge_prompt.json") and set(prompts.by_type) == set(imgedit.EDIT_TYPES)
  item = imgedit.read(bench.imgedit)[4]
  q = imgedit.query(item, prompts)
  assert item.instruction in q.prompt and "<edit_prompt>" not in q.prompt
  assert (q.judgement, q.images, q.text_first) == ("score", ("source", "edited"), True)
  for name in imgedit.CRITERIA[item.edit_type]:
    assert f"\n{name}: " in q.prompt  # our prompt asks for the release's answer lines
  data = json.loads(open(prompts.source).read())
  path = tmp_path / "judge_prompt.json"
  path.write_text(json.dumps({k: v for k, v in data.items() if k != "action"}))
  with pytest.raises(BenchError, match=r"judge_prompt\.json: no prompt for edit type\(s\) \['action'\]"):
    imgedit.load_prompts(path)
  path.write_text(json.dumps({**data, "style": "no placeholder"}))
  with pytest.raises(BenchError, match="prompt 'style' must be a string holding the placeholder <edit_prompt>"):
    imgedit.load_prompts(path)
  with pytest.raises(BenchError, match=r"no ImgEdit judge prompts"):
    imgedit.load_prompts(tmp_path / "nowhere")


def test_resize_like():
  source, edited = Image.new("RGB", (64, 48)), Image.new("RGB", (128, 128), (9, 9, 9))
  assert gedit.resize_like(edited, source).size == (64, 48)
  assert gedit.resize_like(source, source) is source


# ------------------------------------------------------------------------------------------------------ parsing

VIESCORE_ANSWERS = [
    ('{\n"score" : [8, 6],\n"reasoning" : "The hat is there."\n}', (8, 6)),
    ('```json\n{"score": [7, 9], "reasoning": "Clean edit."}\n```', (7, 9)),
    ('Let me look at both images.\n{"score": [5, 10], "reasoning": "Half done."}\nI hope this helps.', (5, 10)),
    ("{'score': [3, 4], 'reasoning': 'single quotes'}", (3, 4)),
    ('{"score": [3, 4,], "reasoning": "trailing commas",}', (3, 4)),
    # full-width braces, colon, brackets, digits and Chinese quotes
    ("\uff5b\u201cscore\u201d\uff1a\uff3b\uff18\uff0c\uff17\uff3d\uff0c"
     "\u201creasoning\u201d\uff1a\u201c\u5f88\u597d\u201d\uff5d", (8, 7)),
    ('{"score": [6\u3001 2], "reasoning": "\u7f16\u8f91\u6210\u529f\u3002"}', (6, 2)),  # Chinese enumeration comma
    ('||V^=^V||\n{\n"score" : [2, 2],\n"reasoning" : "d"\n}\n||V^=^V||', (2, 2)),
    ('{"score": ["8", "7.5"], "reasoning": "strings"}', (8, 7.5)),
    ("[6, 0]", (6, 0)),
    ('Example: {"score": [1, 1]}. My answer: {"score": [9, 8], "reasoning": "x"}', (9, 8)),
    ('{"score": [8, 6], "reasoning": "not score = [2, 2]: the hat fits"}', (8, 6)),
    ("score = [4, 5]\nThe edit is partial.", (4, 5)),
    ('{"score": [11, 5], "reasoning": "too high"}', None),
    ('{"score": [-1, 5]}', None),
    ('{"score": [7], "reasoning": "one number"}', None),
    ('{"score": 7, "reasoning": "scalar"}', None),
    ('{"score": [8, 6, 4]}', None),
    ('{"score": [8, "good"]}', None),
    ("I am unable to evaluate these images.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", VIESCORE_ANSWERS)
def test_parse_viescore(text, expected):
  parsed = parsing.parse_viescore(text)
  if expected is None:
    assert not parsed.ok and parsed.scores is None and parsed.reason
  else:
    assert parsed.ok and parsed.scores == tuple(float(v) for v in expected), parsed.reason


REPLACE = imgedit.CRITERIA["replace"]
IMGEDIT_ANSWERS = [
    ("Brief reasoning: Mug replaces boot; slight blur.\nPrompt Compliance: 4\nVisual Naturalness: 3\n"
     "Physical & Detail Integrity: 3", (4, 3, 3)),
    ("Brief reasoning: Boot gone: 2 shadows remain.\nPrompt Compliance: 4  \nVisual Naturalness: 4  \n"
     "Physical & Detail Integrity: 2  ", (4, 4, 2)),  # trailing blanks; a number in the reasoning line
    ("```\nBrief reasoning: ok\nPrompt Compliance: 5\nVisual Naturalness: 5\nPhysical & Detail Integrity: 4\n```",
     (5, 5, 4)),
    ("Here is my assessment of the edit.\n\n**Prompt Compliance**: 5\n**Visual Naturalness**: 4/5\n"
     "- Physical & Detail Integrity: 3.\n\nOverall a decent replacement.", (5, 4, 3)),
    ("Brief reasoning\uff1a\u66ff\u6362\u6210\u529f\u3002\nPrompt Compliance\uff1a\uff14\nVisual Naturalness\uff1a2\n"
     "Physical & Detail Integrity\uff1a2", (4, 2, 2)),  # full-width colons and digits
    ('{"Prompt Compliance": 4, "Visual Naturalness": 3, "Physical & Detail Integrity": 2,}', (4, 3, 2)),
    ("Physical & Detail Integrity: 1\nPrompt Compliance: 5\nVisual Naturalness: 2", (5, 2, 1)),  # by name
    ("1. Compliance: 3\n2. Naturalness: 2\n3. Physics: 2", (3, 2, 2)),  # other names: three lines, in order
    ("Prompt Compliance: 6\nVisual Naturalness: 3\nPhysical & Detail Integrity: 2", None),
    ("Prompt Compliance: 0\nVisual Naturalness: 3\nPhysical & Detail Integrity: 2", None),
    ("Prompt Compliance: 4\nVisual Naturalness: 3", None),
    ("Prompt Compliance: 4/10\nVisual Naturalness: 3\nPhysical & Detail Integrity: 2", None),
    ("The edit looks nice overall, I would rate it highly.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", IMGEDIT_ANSWERS)
def test_parse_imgedit(text, expected):
  parsed = parsing.parse_imgedit(text, REPLACE)
  if expected is None:
    assert not parsed.ok and parsed.reason
  else:
    assert parsed.ok and parsed.scores == tuple(float(v) for v in expected), parsed.reason


# --------------------------------------------------------------------------------------------------- aggregation


def _gedit_item(key, task, language="en", intersection=False):
  return gedit.Item(key, task, "do it", language, intersection, "", 0)


def _gedit_results():
  return [
      gedit.judge_item(_gedit_item("a1", "color_alter", intersection=True), viescore(8, 6), viescore(9, 4)),
      gedit.judge_item(_gedit_item("a2", "color_alter"), viescore(10, 10), viescore(9, 9)),
      gedit.judge_item(_gedit_item("a3", "color_alter"), "no idea", viescore(9, 9)),
      gedit.judge_item(_gedit_item("b1", "subject-add", intersection=True), viescore(2, 7), viescore(8, 8)),
      gedit.judge_item(_gedit_item("b2", "subject-add"), viescore(5, 5), viescore(12, 3)),
      gedit.judge_item(_gedit_item("c1", "color_alter", "cn"), viescore(5, 5), viescore(5, 5)),
  ]


def test_gedit_item_result():
  results = _gedit_results()
  a1 = results[0]
  assert a1.parsed and a1.subscores == {"SC": (8.0, 6.0), "PQ": (9.0, 4.0)} and a1.subsets == ("intersection",)
  assert a1.id == "color_alter/en/a1" and a1.raw == {"SC": viescore(8, 6), "PQ": viescore(9, 4)}
  assert gedit.item_metrics(a1) == {"SC": 6.0, "PQ": 4.0, "O": math.sqrt(24.0)}
  assert not results[2].parsed and results[2].subscores == {} and results[2].reason.startswith("SC: ")
  assert not results[4].parsed and results[4].reason == "PQ: score 12 outside [0, 10]"


def test_gedit_summary_by_hand():
  summaries = gedit.summarize(_gedit_results(), categories=("color_alter", "subject-add"))
  assert list(summaries) == ["en", "cn"]
  en = summaries["en"]
  ca, sa = en.categories["color_alter"], en.categories["subject-add"]
  assert (ca.n, ca.n_unparseable, ca.n_scored) == (3, 1, 2) and (sa.n, sa.n_unparseable) == (2, 1)
  o_ca = (math.sqrt(6 * 4) + math.sqrt(10 * 9)) / 2
  assert ca.means == pytest.approx({"SC": 8.0, "PQ": 6.5, "O": o_ca})
  assert sa.means == pytest.approx({"SC": 2.0, "PQ": 8.0, "O": 4.0})
  # The overall is the mean of the category means, not of the items ((sqrt(24) + sqrt(90) + 4) / 3).
  assert en.overall == pytest.approx({"SC": 5.0, "PQ": 7.25, "O": (o_ca + 4.0) / 2})
  assert en.missing == () and (en.n, en.n_unparseable) == (5, 2)
  cn = summaries["cn"]
  assert cn.categories["color_alter"].means == pytest.approx({"SC": 5.0, "PQ": 5.0, "O": 5.0})
  assert cn.missing == ("subject-add",) and cn.overall == {"SC": None, "PQ": None, "O": None}
  inter = gedit.summarize(_gedit_results(), categories=("color_alter", "subject-add"), languages=["en"],
                          intersection_only=True)["en"]
  assert inter.subset == "en, intersection" and inter.n == 2
  assert inter.overall == pytest.approx({"SC": 4.0, "PQ": 6.0, "O": (math.sqrt(24) + 4.0) / 2})
  # With the benchmark's 11 task types, nine have no item: no overall.
  full = gedit.summarize(_gedit_results())["en"]
  assert len(full.missing) == 9 and full.overall["O"] is None


def test_gedit_reports_both_tables_per_language():
  """What `launch/evaluate.py` and training report: per language every item, then the Intersection_exist items."""
  tables = gedit.summaries(_gedit_results())
  assert list(tables) == ["en", "en_intersection", "cn", "cn_intersection"]
  for language in ("en", "cn"):
    assert tables[language] == gedit.summarize(_gedit_results(), languages=[language])[language]
    inter = gedit.summarize(_gedit_results(), languages=[language], intersection_only=True)[language]
    assert tables[f"{language}_intersection"] == inter and inter.subset == f"{language}, intersection"
  assert tables["en_intersection"].n == 2 < tables["en"].n


def _imgedit_results():
  def item(key, edit_type):
    return imgedit.Item(key, f"x/{key}.png", f"/x/{key}.png", "do it", edit_type)
  fmt = "Brief reasoning: r\nPrompt Compliance: {}\nVisual Naturalness: {}\nPhysical & Detail Coherence: {}"
  adjust = "Brief reasoning: r\nPrompt Compliance: {}\nVisual Seamlessness: {}\nPhysical & Detail Fidelity: {}"
  compose = ("Brief reasoning: r\nInstruction Compliance: {}\nVisual Naturalness: {}\n"
             "Physical Consistency & Fine Detail: {}")
  return [imgedit.judge_item(item("1", "add"), fmt.format(4, 3, 3)),
          imgedit.judge_item(item("2", "add"), fmt.format(5, 5, 4)),
          imgedit.judge_item(item("3", "add"), "I cannot see the second image."),
          imgedit.judge_item(item("4", "adjust"), adjust.format(2, 1, 1)),
          imgedit.judge_item(item("5", "compose"), compose.format(3, 3, 3)),
          imgedit.judge_item(item("6", "compose"), compose.format(3, 7, 3))]


def test_imgedit_summary_by_hand():
  results = _imgedit_results()
  assert results[0].subscores == {"score": (4.0, 3.0, 3.0)} and results[0].language == "en"
  assert not results[5].parsed and "outside [1, 5]" in results[5].reason
  summary = imgedit.summarize(results, categories=("add", "adjust", "compose"))
  assert summary.categories["add"].means["score"] == pytest.approx((10 / 3 + 14 / 3) / 2)
  assert summary.categories["adjust"].means["score"] == pytest.approx(4 / 3)
  assert summary.categories["compose"].means["score"] == pytest.approx(3.0)
  assert [(c.n, c.n_unparseable) for c in summary.categories.values()] == [(3, 1), (1, 0), (2, 1)]
  assert summary.overall["score"] == pytest.approx((4.0 + 4 / 3 + 3.0) / 3)
  full = imgedit.summarize(results)
  assert list(full.categories) == list(imgedit.EDIT_TYPES) and full.overall["score"] is None
  assert set(full.missing) == {"extract", "replace", "remove", "background", "style", "action"}


def test_results_are_checked_and_round_trip(tmp_path):
  results = _gedit_results()
  path = tmp_path / "results.jsonl"
  base.write_results(path, results)
  assert base.read_results(path) == results
  as_dicts = [r.to_dict() for r in results]
  assert gedit.summarize(as_dicts, categories=("color_alter", "subject-add")) == gedit.summarize(
      results, categories=("color_alter", "subject-add"))
  with pytest.raises(BenchError, match=r"result 0: missing field\(s\) \['raw'\]"):
    base.as_results([{k: v for k, v in as_dicts[0].items() if k != "raw"}])
  with pytest.raises(BenchError, match="item id 'color_alter/en/a1' appears twice"):
    base.as_results([as_dicts[0], as_dicts[0]])
  with pytest.raises(BenchError, match="parsed but has no sub-scores"):
    base.as_results([{**as_dicts[0], "subscores": {}}])
  with pytest.raises(BenchError, match="unparseable but no reason"):
    base.as_results([{**as_dicts[0], "parsed": False, "reason": ""}])
  with pytest.raises(BenchError, match="category 'subject-add' is not one of"):
    gedit.summarize(results, categories=("color_alter",))


def test_markdown_and_compare():
  a = gedit.summarize(_gedit_results(), categories=("color_alter", "subject-add"), languages=["en"])
  table = aggregate.to_markdown(a)
  assert "**GEdit-Bench** (en)" in table and "| category | n | unparseable | SC | PQ | O |" in table
  assert "| color_alter | 3 | 1 | 8.000 | 6.500 | 7.193 |" in table
  assert "| overall (mean of 2 category means) | 5 | 2 | 5.000 | 7.250 | 5.596 |" in table
  b_results = [gedit.judge_item(_gedit_item("x1", "color_alter"), viescore(7, 7), viescore(7, 7)),
               gedit.judge_item(_gedit_item("y1", "subject-add"), viescore(4, 4), viescore(9, 9)),
               gedit.judge_item(_gedit_item("y2", "subject-add"), "?", "?")]
  b = gedit.summarize(b_results, categories=("color_alter", "subject-add"), languages=["en"])
  comparison = aggregate.compare(a, b)["en"]
  o_a = ((math.sqrt(24) + math.sqrt(90)) / 2 + 4.0) / 2
  assert comparison.categories["color_alter"]["SC"].delta == pytest.approx(-1.0)
  assert comparison.categories["color_alter"]["PQ"].delta == pytest.approx(0.5)
  assert comparison.categories["subject-add"]["O"].delta == pytest.approx(2.0)
  assert comparison.overall["O"].delta == pytest.approx(6.5 - o_a)
  assert comparison.unparseable == {"color_alter": (1, 0), "subject-add": (1, 1)}
  md = aggregate.comparison_markdown(comparison, names=("base", "rl"))
  assert "| category | unparseable base/rl | SC base | SC rl | \u0394SC |" in md
  assert "| color_alter | 1/0 | 8.000 | 7.000 | -1.000 |" in md and "| overall | 2/1 |" in md
  assert aggregate.Summary.from_dict(json.loads(json.dumps(a["en"].to_dict()))) == a["en"]
  with pytest.raises(BenchError, match="not the same benchmark"):
    aggregate.compare(a["en"], imgedit.summarize(_imgedit_results(), categories=None))
  imgedit_md = aggregate.to_markdown(imgedit.summarize(_imgedit_results()), decimals=2)
  assert "| hybrid (compose) | 2 | 1 | 3.00 |" in imgedit_md and "No scored item in: extract" in imgedit_md


def test_end_to_end_on_the_mini_benchmark(bench):
  """Every item of both layouts judged (one answer in each category unparseable): full summaries."""
  release = gedit.read(bench.gedit)
  prompts = gedit.load_prompts(bench.gedit_prompts)
  results = []
  for n, item in enumerate(release.items):
    assert len(gedit.queries(item, prompts)) == 2
    results.append(gedit.judge_item(item, viescore(n % 11, 7) if n % 4 else "garbage", viescore(8, 9)))
  summaries = gedit.summarize(results)
  assert list(summaries) == ["en", "cn"]
  for s in summaries.values():
    assert s.missing == () and s.n == 22 and all(v is not None for v in s.overall.values())
  assert sum(s.n_unparseable for s in summaries.values()) == len(release.items) // 4
  items = imgedit.read(bench.imgedit)
  answers = ["Brief reasoning: fine.\n" + "\n".join(
      f"{c}: {1 + (k + j) % 5}" for j, c in enumerate(imgedit.CRITERIA[i.edit_type])) for k, i in enumerate(items)]
  summary = imgedit.summarize([imgedit.judge_item(i, a) for i, a in zip(items, answers)])
  assert summary.missing == () and summary.n_unparseable == 0
  # The scripted answers fix the overall. Items k = 0..17, two per type in EDIT_TYPES order; item k's score is
  # the mean of 1 + (k + j) % 5 over its three criteria j = 0, 1, 2, which depends on k % 5 only:
  #   k % 5 = 0: (1 + 2 + 3) / 3 = 2;  1: (2 + 3 + 4) / 3 = 3;  2: (3 + 4 + 5) / 3 = 4;
  #   3: (4 + 5 + 1) / 3 = 10/3;       4: (5 + 1 + 2) / 3 = 8/3   (one period of 5 sums to 15).
  # Every type has two items, so the mean of the nine type means is the mean of the 18 items:
  #   k = 0..14 sum to 3 * 15 = 45, k = 15, 16, 17 (k % 5 = 0, 1, 2) to 2 + 3 + 4 = 9: (45 + 9) / 18 = 3.
  # A mean of means of thirds of small integers: off by a few ulps at most, hence the 1e-9.
  assert len(items) == 18 and summary.overall["score"] == pytest.approx(3.0, rel=0, abs=1e-9)
