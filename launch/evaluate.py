"""Benchmark an editor: GEdit-Bench (VIEScore) or ImgEdit (Basic), sampled and judged in JAX, resumable.

  python launch/evaluate.py --benchmark=gedit|imgedit --data=DIR --model=PIPELINE_DIR [--lora=FILE] \
      --judge=QWEN_DIR --out=OUT [--prompts=DIR_OR_FILE] [--compare=OTHER_OUT] [--edits=DIR]

--data is the benchmark's release as distributed (GEdit-Bench: its Parquet or Arrow files; ImgEdit: the
unpacked Benchmark/singleturn/ with singleturn.json); --prompts the benchmark's own judge prompts (default:
looked for in --data). --edits judges edits made elsewhere (any editor: <item>.png as OUT/edits/ lays them
out) instead of sampling. Writes OUT/edits/, OUT/results.jsonl, OUT/summary.json, OUT/summary.md and
OUT/gallery/<category>.png; with --compare, both runs side by side. Run it again to continue a killed run.
Sampling settings default to the family's `benchmark_sampling`, the settings the benchmark reproductions use
(Kontext: 28 Euler steps, guidance 3.5, its resolution rule). Every path flag takes a local path or a gs:// URL
(OUT in a bucket: results.jsonl is rewritten whole after each judged batch).
"""

import sys

from absl import app, flags, logging

from editr1_jax import paths

flags.DEFINE_enum("benchmark", None, ["gedit", "imgedit"], "Which benchmark protocol.")
flags.DEFINE_string("data", None, "The benchmark's release folder.")
flags.DEFINE_string("prompts", None, "The benchmark's judge prompts (default: found in --data).")
flags.DEFINE_string("model", None, "The editor's pipeline folder (diffusers layout); not needed with --edits.")
flags.DEFINE_string("family", None, "The editor's model family (default: read from --model's model_index.json; "
                    "kontext with --edits).")
flags.DEFINE_string("lora", None, "A LoRA file to apply to the editor (our export or diffusers / peft).")
flags.DEFINE_float("lora_alpha", None, "LoRA alpha, only for a file without rank/alpha metadata.")
flags.DEFINE_string("edits", None, "Judge the edits in this folder instead of sampling (<item>.png).")
flags.DEFINE_string("judge", None, "The judge: a Qwen2.5-VL folder (transformers layout).")
flags.DEFINE_string("out", None, "Output folder (reused: what it holds is not computed again).")
flags.DEFINE_string("compare", None, "Another evaluation's OUT, put side by side with this one.")
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
  for name in ("data", "prompts", "model", "lora", "edits", "judge", "out", "compare", "reward_model"):
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
  need_dir("compare", required=False)
  need_dir("reward_model", required=False)
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
  for name, low in (("steps", 1), ("batch_size", 1), ("max_new_tokens", 1)):
    if FLAGS[name].value < low:
      sys.exit(f"error: --{name} must be at least {low}, got {FLAGS[name].value}")
  if FLAGS.guidance < 0:
    sys.exit(f"error: --guidance must be >= 0, got {FLAGS.guidance}")


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
    task = run.make_task(FLAGS.benchmark, FLAGS.data, FLAGS.prompts)
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
                    mesh=mesh)
  with tqdm(total=len(task.items), desc="judging", unit="item") as bar:
    results = run.judge_items(task, judge, edits_dir, paths.join(FLAGS.out, run.RESULTS),
                              batch_size=FLAGS.batch_size, progress=bar.update)
  del judge
  gc.collect()
  reward = None
  if FLAGS.reward_model is not None:
    from editr1_jax.reward.mllm import MllmJudge
    scorer = MllmJudge(FLAGS.reward_model, dtype=FLAGS.dtype, mesh=mesh, batch_size=FLAGS.batch_size)
    rows = run.reward_items(task, scorer, edits_dir, paths.join(FLAGS.out, run.REWARD), batch_size=FLAGS.batch_size)
    reward = run.reward_summary(rows.values())
  run.write_summary(task, results.values(), FLAGS.out, FLAGS.compare, reward)
  run.write_gallery(task, results, FLAGS.out, FLAGS.compare)
  print(paths.read_text(paths.join(FLAGS.out, "summary.md")))


if __name__ == "__main__":
  app.run(main)
