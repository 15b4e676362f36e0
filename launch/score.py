"""Score one edit with the MLLM judge: prints the reward and the probabilities of the digits 0..5.

  python launch/score.py --model=DIR --source=A.png --edited=B.png --instruction="..." \
      [--requirement="..."] [--template_file=F] [--json]

DIR is a transformers Qwen2.5-VL folder (config.json, safetensors, tokenizer, chat template,
preprocessor_config.json). Images are read as stored (PNG stays lossless). With --json the output
is exactly one JSON object, {"score": ..., "probs": [...]}; an invalid (non-finite) score is an error. Every path
flag takes a local path or a gs:// URL.
"""

import json
import sys

from absl import app, flags

from editr1_jax import paths
from editr1_jax.reward import mllm, processor

flags.DEFINE_string("model", None, "Qwen2.5-VL folder (transformers layout).", required=True)
flags.DEFINE_string("source", None, "The source image.", required=True)
flags.DEFINE_string("edited", None, "The edited image.", required=True)
flags.DEFINE_string("instruction", None, "The edit instruction.", required=True)
flags.DEFINE_string("requirement", "", "The task requirement.")
flags.DEFINE_string("template_file", None, "Judging prompt with {instruction} and {requirement}; default: "
                    "editr1_jax/reward/judge_prompt.txt.")
flags.DEFINE_string("dtype", "float32", "Compute dtype of the judge.")
flags.DEFINE_bool("json", False, "Print one JSON object with keys score and probs.")
FLAGS = flags.FLAGS


def _image(flag: str):
  """The image of --`flag`, decoded as the dataset and the editor decode it; exits naming the flag."""
  try:
    return processor.read_image(FLAGS[flag].value)
  except processor.ProcessorError as e:
    sys.exit(f"error: --{flag}: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("model", "source", "edited", "template_file"):
    if FLAGS[name].value is not None:
      try:  # an unsupported URL scheme, a bucket that is not there
        paths.check_bucket(FLAGS[name].value, f"--{name}")
      except paths.PathError as e:
        sys.exit(f"error: {e}")
  if not paths.isdir(FLAGS.model):
    sys.exit(f"error: --model: {FLAGS.model} is not a folder")
  if not FLAGS.instruction.strip():
    sys.exit("error: --instruction is empty")
  if FLAGS.template_file is not None and not paths.isfile(FLAGS.template_file):
    sys.exit(f"error: --template_file: {FLAGS.template_file} not found")
  source, edited = _image("source"), _image("edited")
  try:
    judge = mllm.MllmJudge(FLAGS.model, template_file=FLAGS.template_file, dtype=FLAGS.dtype, batch_size=1,
                           length_multiple=1)
    result = judge.score([source], [edited], [FLAGS.instruction], [FLAGS.requirement])
  except ValueError as e:  # a bad model folder or template: the message names it
    sys.exit(f"error: {e}")
  if not result.valid[0]:
    sys.exit(f"{FLAGS.edited}: the judge's digit logits are not finite; no score")
  score, probs = float(result.scores[0]), [float(p) for p in result.probs[0]]
  if FLAGS.json:
    print(json.dumps({"score": score, "probs": probs}))
  else:
    print(f"score: {score:.6f}")
    print("probs: " + "  ".join(f"{d}: {p:.6f}" for d, p in zip(mllm.DIGITS, probs)))


if __name__ == "__main__":
  app.run(main)
