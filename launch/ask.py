"""Ask Qwen2.5-VL about images: prints its greedy answer to one user turn made of the images (in order),
then the text, rendered with the folder's chat template.

  python launch/ask.py --model=DIR --image=A.png [--image=B.png ...] --prompt="..." [--max_new_tokens=N] [--json]

DIR is a transformers Qwen2.5-VL folder (config.json, safetensors, tokenizer, chat template,
preprocessor_config.json). Decoding stops at the folder's EOS ids (generation_config.json, else
config.json); its sampling settings (temperature, top-p, repetition penalty) are not applied: the
answer is plain greedy. With --json the output is exactly one JSON object, {"text": ..., "token_ids":
[...]}: the generated ids, the EOS included when one was reached, and their text without special tokens.
--model and --image take a local path or a gs:// URL.
"""

import json
import sys

import numpy as np
from absl import app, flags

from editr1_jax import generation, images, paths
from editr1_jax.models import qwen2_5_vl
from editr1_jax.reward import processor

flags.DEFINE_string("model", None, "Qwen2.5-VL folder (transformers layout).")
flags.DEFINE_multi_string("image", None, "An image of the question; repeat the flag for several, in order.")
flags.DEFINE_string("prompt", None, "The text of the question, after the images.")
flags.DEFINE_integer("max_new_tokens", 128, "Most tokens of the answer.")
flags.DEFINE_string("dtype", "float32", "Compute dtype of the model.")
flags.DEFINE_bool("json", False, "Print one JSON object with keys text and token_ids.")
FLAGS = flags.FLAGS


def _validated_images() -> list:
  """The --image files decoded as the dataset, the editor and the judge decode them; exits naming the flag."""
  if not FLAGS.image:
    sys.exit("error: --image: give at least one image")
  try:
    return [images.load_rgb(path) for path in FLAGS.image]
  except images.ImageError as e:
    sys.exit(f"error: --image: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name, values in (("model", [FLAGS.model]), ("image", FLAGS.image or [])):
    for value in values:
      if value is not None:
        try:  # an unsupported URL scheme, a bucket that is not there
          paths.check_bucket(value, f"--{name}")
        except paths.PathError as e:
          sys.exit(f"error: {e}")
  if FLAGS.model is None or not paths.isdir(FLAGS.model):
    sys.exit(f"error: --model: {FLAGS.model} is not a folder")
  pictures = _validated_images()
  if FLAGS.prompt is None or not FLAGS.prompt.strip():
    sys.exit("error: --prompt is empty")
  if FLAGS.max_new_tokens < 1:
    sys.exit(f"error: --max_new_tokens must be at least 1, got {FLAGS.max_new_tokens}")
  try:
    chat = processor.ChatFormatter(FLAGS.model, processor.ImageProcessorConfig.from_folder(FLAGS.model))
    eos, pad = generation.stop_tokens(FLAGS.model)
    model = qwen2_5_vl.load_qwen2_5_vl(FLAGS.model, dtype=FLAGS.dtype)
    batch = generation.chat_batch(chat, [(pictures, FLAGS.prompt)], model.cfg)
  except ValueError as e:  # a bad model folder or prompt: the message names the file or field
    sys.exit(f"error: {e}")
  out = generation.generate(model, batch, max_new_tokens=FLAGS.max_new_tokens, eos_token_ids=eos, pad_token_id=pad)
  token_ids = np.asarray(out.token_ids[0, :int(out.lengths[0])]).tolist()
  text = chat.tokenizer.decode(token_ids, skip_special_tokens=True)
  print(json.dumps({"text": text, "token_ids": token_ids}) if FLAGS.json else text)


if __name__ == "__main__":
  app.run(main)
