"""Benchmark an editor: GEdit-Bench (VIEScore) or ImgEdit (Basic), sampled and judged in JAX, resumable.

  python launch/evaluate.py --benchmark=gedit|imgedit --data=DIR --model=PIPELINE_DIR [--lora=FILE] \
      --judge=QWEN_DIR --out=OUT [--prompts=DIR_OR_FILE] [--compare=OTHER_OUT] [--edits=DIR]

--data is the benchmark's release as distributed (GEdit-Bench: its Parquet or Arrow files; ImgEdit: the
unpacked Benchmark/singleturn/ with its images, and singleturn.json or the GitHub repository's basic_edit.json);
--items names ImgEdit's items file (either layout) when it is elsewhere; --prompts the benchmark's own judge
prompts (default: looked for in --data, then beside --items). --edits judges edits made elsewhere (any editor:
<item>.png as OUT/edits/ lays them out) instead of sampling. Writes OUT/edits/, OUT/results.jsonl,
OUT/summary.json (with how the items were judged), OUT/summary.md, OUT/gallery/<category>.png and the judged
items in the benchmark's own per-item format under OUT/upstream/ (GEdit-Bench: the CSVs its
calculate_statistics.py reads, under OUT/upstream/gedit/<model_name>/qwen25vl/eval_results_new/; ImgEdit:
result.json for its step1_get_avgscore.py). --compare puts another run beside this one: its OUT, or such upstream
files from elsewhere (a published model's: a CSV folder of one model, or <folder>/<model> to pick one). Run it
again to continue a killed run.
Sampling settings default to the family's `benchmark_sampling`, the settings the benchmark reproductions use
(Kontext: 28 Euler steps, guidance 3.5, its resolution rule). Every path flag takes a local path or a gs:// URL
(OUT in a bucket: results.jsonl is rewritten whole after each judged batch).
"""

import sys

from absl import app, flags, logging

from editr1_jax import paths

flags.DEFINE_enum("benchmark", None, ["gedit", "imgedit"], "Which benchmark protocol.")
flags.DEFINE_string("data", None, "The benchmark's release folder.")
flags.DEFINE_string("prompts", None, "The benchmark's judge prompts (default: found in --data, or beside --items).")
flags.DEFINE_string("items", None, "ImgEdit: the items file (singleturn.json or basic_edit.json; default: found in "
                    "--data).")
flags.DEFINE_string("model", None, "The editor's pipeline folder (diffusers layout); not needed with --edits.")
flags.DEFINE_string("family", None, "The editor's model family (default: read from --model's model_index.json; "
                    "kontext with --edits).")
flags.DEFINE_string("lora", None, "A LoRA file to apply to the editor (our export or diffusers / peft).")
flags.DEFINE_float("lora_alpha", None, "LoRA alpha, only for a file without rank/alpha metadata.")
flags.DEFINE_string("edits", None, "Judge the edits in this folder instead of sampling (<item>.png).")
flags.DEFINE_string("judge", None, "The judge: a Qwen2.5-VL folder (transformers layout).")
flags.DEFINE_string("out", None, "Output folder (reused: what it holds is not computed again).")
flags.DEFINE_string("compare", None, "Another run put side by side with this one: an evaluation's OUT, or the "
                    "benchmark's upstream per-item files (GEdit-Bench CSVs: a file or a folder; ImgEdit result.json).")
flags.DEFINE_string("model_name", None, "The model's name in the upstream per-item files (GEdit-Bench: "
                    "<model_name>_<task type>_gpt_score.csv; default: --model's or --edits' folder name).")
flags.DEFINE_integer("judge_min_pixels", None, "The judge's image processor min_pixels (default: its folder's "
                     "preprocessor_config.json; ImgEdit-Judge recommends 1016064).")
flags.DEFINE_integer("judge_max_pixels", None, "The judge's image processor max_pixels (default: its folder's "
                     "preprocessor_config.json; ImgEdit-Judge recommends 1354752).")
flags.DEFINE_string("reward_model", None, "Also report our training reward (a Qwen2.5-VL folder's logit-expectation "
                    "score) beside the benchmark's judge.")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the family's `benchmark_sampling`).")
flags.DEFINE_float("guidance", None, "Kontext: guidance-embedding value; Qwen-Image-Edit: true CFG scale (default: "
                   "the family's `benchmark_sampling`).")
flags.DEFINE_enum("sampler", None, ["euler", "dpm2", "sde"], "Solver (default: the family's `benchmark_sampling`).")
flags.DEFINE_integer("seed", 0, "Seed: item i's noise is fold_in(key(seed, 'edit'), i).")
flags.DEFINE_bool("auto_resize", True, "Resize sources as the family's pipeline does (Kontext: its training "
                  "resolutions); else only floor their sides to the model's multiple.")
flags.DEFINE_integer("batch_size", 1, "Items per sampling / judging call (a multiple of the device count splits "
                     "them over the devices).")
flags.DEFINE_integer("max_new_tokens", 512, "Most tokens of a judge answer.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype of the editor and the judge.")
FLAGS = flags.FLAGS


def _check_flags() -> None:
  """Every flag before anything is loaded; exits with one line naming the flag."""
  for name in ("data", "prompts", "items", "model", "lora", "edits", "judge", "out", "compare", "reward_model"):
    if FLAGS[name].value is not None:
      try:  # an unsupported URL scheme, a bucket that is not there
        paths.check_bucket(FLAGS[name].value, f"--{name}")
      except paths.PathError as e:
        sys.exit(f"error: {e}")

  def need_dir(name, required=True):
    value = FLAGS[name].value
    if value is None and not required:
      return
    if value is None or not paths.isdir(value):
      sys.exit(f"error: --{name}: {value} is not a folder")
  need_dir("data")
  need_dir("judge")
  need_dir("edits", required=False)
  need_dir("reward_model", required=False)
  if FLAGS.compare is not None and not (paths.exists(FLAGS.compare) or paths.isdir(paths.dirname(FLAGS.compare))):
    sys.exit(f"error: --compare: {FLAGS.compare} not found")  # <folder>/<model> names one model's GEdit CSVs
  if FLAGS.items is not None and not paths.isfile(FLAGS.items):
    sys.exit(f"error: --items: {FLAGS.items} is not a file")
  if FLAGS.items is not None and FLAGS.benchmark != "imgedit":
    sys.exit("error: --items: only ImgEdit takes an items file (GEdit-Bench's items are its --data files)")
  if FLAGS.edits is None:
    need_dir("model")
  if FLAGS.lora is not None and not paths.isfile(FLAGS.lora):
    sys.exit(f"error: --lora: {FLAGS.lora} not found")
  if FLAGS.out is None or paths.isfile(FLAGS.out):
    sys.exit(f"error: --out: {FLAGS.out} must be a folder")
  if FLAGS.prompts is not None and not paths.exists(FLAGS.prompts):
    sys.exit(f"error: --prompts: {FLAGS.prompts} not found")
  from editr1_jax import families
  if FLAGS.family is None:
    try:
      FLAGS.family = families.family_of_folder(FLAGS.model) if FLAGS.edits is None else "kontext"
    except ValueError as e:
      sys.exit(f"error: --model: {e}")
  if FLAGS.family not in families.FAMILIES:
    sys.exit(f"error: --family: {FLAGS.family!r} is not one of {sorted(families.FAMILIES)}")
  for name, value in families.family_class(FLAGS.family).benchmark_sampling.items():
    if FLAGS[name].value is None:
      FLAGS[name].value = value
  for name, low in (("steps", 1), ("batch_size", 1), ("max_new_tokens", 1), ("judge_min_pixels", 1),
                    ("judge_max_pixels", 1)):
    if FLAGS[name].value is not None and FLAGS[name].value < low:
      sys.exit(f"error: --{name} must be at least {low}, got {FLAGS[name].value}")
  if FLAGS.guidance < 0:
    sys.exit(f"error: --guidance must be >= 0, got {FLAGS.guidance}")
  if FLAGS.judge_min_pixels is not None or FLAGS.judge_max_pixels is not None:  # checked with the folder's bounds
    from editr1_jax.reward import processor
    try:
      folder = processor.ImageProcessorConfig.from_folder(FLAGS.judge)
    except (ValueError, OSError) as e:
      sys.exit(f"error: --judge: {e}")
    try:
      folder.with_pixels(FLAGS.judge_min_pixels, FLAGS.judge_max_pixels)
    except processor.ProcessorError as e:
      sys.exit(f"error: --judge_min_pixels / --judge_max_pixels: {e} (given, or the judge folder's "
               "preprocessor_config.json)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  _check_flags()
  import gc

  from tqdm import tqdm

  from editr1_jax import sharding as shd
  from editr1_jax.bench import BenchError, run
  mesh = shd.make_mesh((-1, 1, 1))  # data-parallel over every device: a batch's rows split where they divide
  try:
    task = run.make_task(FLAGS.benchmark, FLAGS.data, FLAGS.prompts, FLAGS.items)
    if FLAGS.compare is not None:  # refused now, not after hours of sampling and judging
      run.read_other(task, FLAGS.compare)
  except BenchError as e:
    sys.exit(f"error: {e}")
  edits_dir = paths.join(FLAGS.out, run.EDITS)
  paths.makedirs(edits_dir)
  if FLAGS.edits is not None:  # another editor's outputs: copied in, so OUT is a complete record
    given, copied = run.file_check(FLAGS.edits), run.file_check(edits_dir)
    for item in task.items:
      src = run.edit_path(FLAGS.edits, item)
      if not given(src):
        sys.exit(f"error: --edits: {src} not found (item {item.id})")
      if not copied(run.edit_path(edits_dir, item)):
        paths.copy_file(src, run.edit_path(edits_dir, item))
  else:
    from editr1_jax import metrics, streams
    from editr1_jax.pipeline import Editor
    editor = Editor.from_folder(FLAGS.model, family=FLAGS.family, dtype=FLAGS.dtype, lora_weights=FLAGS.lora,
                                lora_alpha=FLAGS.lora_alpha, mesh=mesh)
    keys = streams.row_keys(FLAGS.seed, "edit", 0, len(task.items))

    def edit(sources, instructions, indices):
      images, _ = editor(sources, instructions, num_steps=FLAGS.steps, guidance=FLAGS.guidance, keys=keys[indices],
                         solver=FLAGS.sampler, auto_resize=FLAGS.auto_resize)
      return metrics.to_uint8(images)

    with tqdm(total=len(task.items), desc="editing", unit="item") as bar:
      run.sample_edits(task, edit, edits_dir, batch_size=FLAGS.batch_size, progress=bar.update)
    del editor, edit
    gc.collect()  # the editor leaves before the judge comes
  from editr1_jax.bench.judge import QwenJudge
  judge = QwenJudge(FLAGS.judge, max_new_tokens=FLAGS.max_new_tokens, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype,
                    mesh=mesh, min_pixels=FLAGS.judge_min_pixels, max_pixels=FLAGS.judge_max_pixels)
  with tqdm(total=len(task.items), desc="judging", unit="item") as bar:
    results = run.judge_items(task, judge, edits_dir, paths.join(FLAGS.out, run.RESULTS),
                              batch_size=FLAGS.batch_size, progress=bar.update)
  settings = {"judge": {**judge.settings, "folder": paths.absolute(FLAGS.judge)},
         "editor": {"edits": paths.absolute(FLAGS.edits)} if FLAGS.edits is not None else
         {"model": paths.absolute(FLAGS.model), "family": FLAGS.family, "lora": FLAGS.lora, "steps": FLAGS.steps,
          "guidance": FLAGS.guidance, "sampler": FLAGS.sampler, "seed": FLAGS.seed, "auto_resize": FLAGS.auto_resize,
          "dtype": FLAGS.dtype}}
  del judge
  gc.collect()
  reward = None
  if FLAGS.reward_model is not None:
    from editr1_jax.reward.mllm import MllmJudge
    scorer = MllmJudge(FLAGS.reward_model, dtype=FLAGS.dtype, mesh=mesh, batch_size=FLAGS.batch_size)
    rows = run.reward_items(task, scorer, edits_dir, paths.join(FLAGS.out, run.REWARD), batch_size=FLAGS.batch_size)
    reward = run.reward_summary(rows.values())
  run.write_summary(task, results.values(), FLAGS.out, FLAGS.compare, reward, settings)
  run.write_gallery(task, results, FLAGS.out, FLAGS.compare)
  from editr1_jax.bench import interop
  interop.write(FLAGS.benchmark, results.values(), task.items, FLAGS.out,
                model=FLAGS.model_name or interop.model_name(FLAGS.model, FLAGS.edits), edits_dir=edits_dir)
  print(paths.read_text(paths.join(FLAGS.out, "summary.md")))


if __name__ == "__main__":
  app.run(main)
