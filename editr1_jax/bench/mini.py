"""A tiny benchmark drawn in code, in both releases' layouts, for the tests and the CPU demo.

`write(folder)` writes
- `gedit/`: GEdit-Bench rows (every task type, each instruction in English and Chinese) as one Parquet file
  `data/train-00000-of-00001.parquet`, or (`gedit_format="arrow"`) as `datasets` saves a split:
  `train/data-00000-of-00001.arrow` + `state.json`;
- `gedit_prompts/`: VIEScore-style prompts of our own words, as the generated module `viescore/vie_prompts.py`
  (`gedit_prompts="module"`) or as VIEScore's raw text files `prompts_raw/...` (`gedit_prompts="raw"`);
- `imgedit/Benchmark/singleturn/`: ImgEdit Basic items (`singleturn.json`), images in sub-folders, and a
  `judge_prompt.json` of our own words; the same items and prompts in the GitHub repository's layout in
  `imgedit/Benchmark/Basic/` (`basic_edit.json`, with the repository's early type name "alter" for "adjust", and
  `prompts.json`).
`folder` may be a gs:// URL. The prompts only share the releases' structure (variable / file names, placeholders,
answer formats and criterion names); none of their text. Images are small shapes drawn with PIL from `seed`.

  python -m editr1_jax.bench.mini OUT_DIR
"""

import dataclasses
import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from editr1_jax import images, paths
from editr1_jax.bench import gedit, imgedit

COLOURS = (("red", "红色", (214, 48, 49)), ("blue", "蓝色", (9, 132, 227)), ("green", "绿色", (0, 184, 148)),
           ("yellow", "黄色", (253, 203, 110)))
GEDIT_INSTRUCTIONS = {  # (English, Chinese), {c} = a colour
    "background_change": ("Turn the background {c}.", "把背景变成{c}。"),
    "color_alter": ("Paint the square {c}.", "把方块涂成{c}。"),
    "material_alter": ("Make the square look like {c} glass.", "让方块看起来像{c}的玻璃。"),
    "motion_change": ("Slide the circle to the left edge.", "把圆形挪到左边。"),
    "ps_human": ("Brighten the figure's face a little.", "把人物的脸调亮一点。"),
    "style_change": ("Redraw the picture as a {c} pencil sketch.", "把画面改成{c}铅笔素描的风格。"),
    "subject-add": ("Put a small {c} circle in the top corner.", "在右上角放一个{c}的小圆。"),
    "subject-remove": ("Take the square out of the picture.", "把方块从画面里去掉。"),
    "subject-replace": ("Swap the square for a {c} triangle.", "把方块换成{c}的三角形。"),
    "text_change": ("Change the word to HELLO.", "把文字改成“你好”。"),
    "tone_transfer": ("Give the picture a {c} evening tint.", "给画面加上{c}的傍晚色调。"),
}
IMGEDIT_INSTRUCTIONS = {
    "add": ("for_add", "Put a {c} ball next to the box."),
    "adjust": ("daily object", "Make the box {c}."),
    "extract": ("animal", "Cut out the box on a white background."),
    "replace": ("transport", "Replace the box with a {c} ball."),
    "remove": ("daily object", "Remove the ball."),
    "background": ("architecture", "Make the background {c}."),
    "style": ("style", "Redraw this as a {c} watercolour."),
    "compose": ("compose", "Remove the ball and make the box {c}."),
    "action": ("human", "Let the stick figure raise one arm."),
}


@dataclasses.dataclass(frozen=True)
class MiniBenchmark:
  gedit: str  # the GEdit-Bench data folder (gedit.read)
  gedit_prompts: str  # folder for gedit.load_prompts
  imgedit: str  # the ImgEdit singleturn folder (imgedit.read, imgedit.load_prompts)
  n_gedit: int
  n_imgedit: int

  @property
  def imgedit_github(self) -> str:
    """The GitHub layout's folder (`basic_edit.json`, `prompts.json`; the images stay in `imgedit`)."""
    return paths.join(paths.dirname(self.imgedit), "Basic")


def _png(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, "PNG")
  return buf.getvalue()


def draw(rng: np.random.Generator, size: tuple[int, int] = (64, 48), text: str | None = None) -> Image.Image:
  """A background, a square and a circle (and a word) at random places."""
  w, h = size
  colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(3)]
  image = Image.new("RGB", size, colours[0])
  d = ImageDraw.Draw(image)
  s = max(4, min(w, h) // 3)
  x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
  d.rectangle((x, y, x + s, y + s), fill=colours[1])
  r = max(2, s // 2)
  cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
  d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colours[2])
  if text:
    d.text((2, h - 12), text, fill=(255, 255, 255))
  return image


def _gedit_rows(rng: np.random.Generator, per_category: int) -> list[dict]:
  rows = []
  for t, task in enumerate(gedit.TASK_TYPES):
    for j in range(per_category):
      name, name_cn, _ = COLOURS[(t + j) % len(COLOURS)]
      en, cn = GEDIT_INSTRUCTIONS[task]
      word = "ABC" if task == "text_change" else None
      raw = draw(rng, (96, 72), word)
      source = raw.resize((64, 48), Image.Resampling.BICUBIC)
      key = f"{t:02d}{j:02d}{int(rng.integers(0, 16 ** 6)):06x}"
      for language, text in (("en", en.format(c=name)), ("cn", cn.format(c=name_cn))):
        rows.append({"task_type": task, "key": key, "instruction": text, "instruction_language": language,
                     "input_image": {"bytes": _png(source), "path": None},
                     "input_image_raw": {"bytes": _png(raw), "path": None}, "Intersection_exist": j % 2 == 0})
  return rows


def _write_gedit(folder: str, rows: list[dict], fmt: str) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq
  image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  schema = pa.schema([("task_type", pa.string()), ("key", pa.string()), ("instruction", pa.string()),
                      ("instruction_language", pa.string()), ("input_image", image), ("input_image_raw", image),
                      ("Intersection_exist", pa.bool_())])
  table = pa.Table.from_pylist(rows, schema=schema)
  sink = pa.BufferOutputStream()
  if fmt == "parquet":
    pq.write_table(table, sink, row_group_size=16)
    paths.write_bytes(paths.join(folder, "data", "train-00000-of-00001.parquet"), sink.getvalue().to_pybytes())
  elif fmt == "arrow":
    split = paths.join(folder, "train")
    name = "data-00000-of-00001.arrow"
    with pa.ipc.new_stream(sink, schema) as writer:
      writer.write_table(table, max_chunksize=16)
    paths.write_bytes(paths.join(split, name), sink.getvalue().to_pybytes())
    paths.write_text(paths.join(split, "state.json"),
                     json.dumps({"_data_files": [{"filename": name}], "_split": "train"}, indent=1))
  else:
    raise ValueError(f"gedit_format {fmt!r}: expected 'parquet' or 'arrow'")


# Our own words, in VIEScore's structure: a context that asks for {"score": [...], "reasoning": ...}, the rule of a
# two-image edit, the SC rule (two scores; the instruction at <instruction>) and the PQ rule (two scores).
GEDIT_PROMPTS = {
    "context": ("You grade pictures made by an image model, following the rules below.\n"
                "Answer with JSON only, shaped like this (keep the reasoning to one sentence):\n"
                '{\n"score" : [...],\n"reasoning" : "..."\n}'),
    "edit_rule": ("RULES:\n\nYou get two pictures: the first is the original, the second was edited from it.\n"
                  "Judge how well the second picture carries out the editing instruction.\n"),
    "sc_rule": ("\nGive two integers between 0 and 10.\n"
                "First: did the edit do what the instruction asks (0 = not at all, 10 = exactly)?\n"
                "Second: how much was left untouched (0 = a different picture, 10 = only the asked change)?\n"
                "score = [first, second]\n\nInstruction: <instruction>\n"),
    "pq_rule": ("RULES:\n\nYou get one picture made by an image model.\n\n"
                "Give two integers between 0 and 10.\n"
                "First: does the scene look natural (light, shadows, depth)? 0 = not at all, 10 = fully.\n"
                "Second: is it free of artifacts (distortions, smears, broken shapes)? 0 = full of them, 10 = none.\n"
                "score = [natural, clean]\n"),
}


def _write_gedit_prompts(folder: str, layout: str) -> None:
  if layout == "module":
    lines = ["# Prompts of the editr1_jax mini-benchmark, in the structure of VIEScore's vie_prompts.py.\n"]
    for name, variable in gedit.PROMPT_VARIABLES.items():
      lines.append(f"{variable} = {GEDIT_PROMPTS[name]!r}\n")
    paths.write_text(paths.join(folder, "viescore", "vie_prompts.py"), "\n".join(lines))
  elif layout == "raw":
    for name, rel in gedit.PROMPT_FILES.items():
      paths.write_text(paths.join(folder, "prompts_raw", rel), GEDIT_PROMPTS[name])
  else:
    raise ValueError(f"gedit_prompts {layout!r}: expected 'module' or 'raw'")


def imgedit_prompt(edit_type: str) -> str:
  """Our own judge prompt for one ImgEdit type, in the release's structure: three criteria scored 1..5, the
  answer as "Brief reasoning: ..." then one "<criterion>: <n>" line each, the instruction at <edit_prompt>."""
  first, second, third = imgedit.CRITERIA[edit_type]
  return (f"\nYou score a {edit_type} edit. You get the picture before and after the edit and the instruction.\n"
          f"Score each aspect from 1 (worst) to 5 (best).\n\n"
          f"{first}\n1  the asked change is missing\n5  the asked change is done exactly\n\n"
          f"{second}\n1  the picture is broken\n5  no trace of editing is visible\n\n"
          f"{third}\n1  light and shapes are wrong\n5  everything is physically right\n\n"
          f"Answer format:\nBrief reasoning: at most 20 words.\n{first}: 1-5.\n{second}: 1-5.\n{third}: 1-5.\n"
          f"The instruction: {imgedit.PLACEHOLDER}\n\nThe pictures before and after:\n")


def _write_imgedit(root: str, rng: np.random.Generator, per_category: int) -> int:
  items, key = {}, 1
  for t, edit_type in enumerate(imgedit.EDIT_TYPES):
    sub, template = IMGEDIT_INSTRUCTIONS[edit_type]
    for j in range(per_category):
      rel = f"{sub}/{key:09d}.png"
      images.save(draw(rng, (64, 48)), paths.join(root, rel))
      items[str(key)] = {"id": rel, "prompt": template.format(c=COLOURS[(t + j) % len(COLOURS)][0]),
                         "edit_type": edit_type}
      key += 1
  prompts = json.dumps({t: imgedit_prompt(t) for t in imgedit.EDIT_TYPES}, indent=2, ensure_ascii=False)
  paths.write_text(paths.join(root, imgedit.ITEMS_FILE), json.dumps(items, indent=4, ensure_ascii=False))
  paths.write_text(paths.join(root, imgedit.PROMPTS_FILE), prompts)
  github = paths.join(paths.dirname(root), "Basic")
  renamed = {k: {**v, "edit_type": "alter" if v["edit_type"] == "adjust" else v["edit_type"]} for k, v in items.items()}
  paths.write_text(paths.join(github, imgedit.GITHUB_ITEMS_FILE), json.dumps(renamed, indent=4, ensure_ascii=False))
  paths.write_text(paths.join(github, imgedit.GITHUB_PROMPTS_FILE), prompts)
  return len(items)


def write(folder: str | os.PathLike, per_category: int = 2, seed: int = 0, gedit_format: str = "parquet",
          gedit_prompts: str = "module") -> MiniBenchmark:
  """Writes the mini-benchmark under `folder` (see the module docstring): `per_category` items per GEdit task
  type (each in English and Chinese) and per ImgEdit edit type."""
  if per_category < 1:
    raise ValueError(f"per_category must be at least 1, got {per_category}")
  folder = os.fspath(folder)
  rng = np.random.default_rng(seed)
  rows = _gedit_rows(rng, per_category)
  gedit_dir, prompts_dir = paths.join(folder, "gedit"), paths.join(folder, "gedit_prompts")
  _write_gedit(gedit_dir, rows, gedit_format)
  _write_gedit_prompts(prompts_dir, gedit_prompts)
  imgedit_dir = paths.join(folder, "imgedit", "Benchmark", "singleturn")
  n_imgedit = _write_imgedit(imgedit_dir, rng, per_category)
  return MiniBenchmark(gedit_dir, prompts_dir, imgedit_dir, len(rows), n_imgedit)


if __name__ == "__main__":
  import sys
  if len(sys.argv) != 2:
    sys.exit("usage: python -m editr1_jax.bench.mini OUT_DIR")
  print(write(sys.argv[1]))
