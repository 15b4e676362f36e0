"""MLLM reward prefill: scoring a batch of (source, edited) pairs with our judge (processor + jitted
step) vs transformers eager (PIL processor + chat template + `Qwen2_5_VLForConditionalGeneration`,
left-padded batch, logits of the last position only), same weights, same inputs, both end to end.

  python benchmarks/reward_prefill.py [--sizes tiny,small] [--pairs 2] [--image 224] [--repeats 3]

"tiny" is the test model. "small" has real widths with few blocks: the Qwen2.5-VL vision tower
(1280 wide, 16 heads, MLP 3420; 1 windowed + 1 full-attention block, 112-pixel windows) and the
Qwen2.5-VL-3B decoder width (2048, 16 heads, 2 kv heads, MLP 11008) with 2 layers; the vocabulary is
the test tokenizer's. Also printed: the tokens of one pair at 512x512 under the real preprocessing
bounds. The last line is the "small" ratio.
"""

import os
import sys
import tempfile

import jax
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from benchmarks.common import arguments, median_ms, print_table, same_footing  # noqa: E402
from editr1_jax.reward import mllm  # noqa: E402
from editr1_jax.reward import processor as proc  # noqa: E402
from qwen_fixtures import (random_image, reference_chat_ids, tiny_config, write_preprocessor_config,  # noqa: E402
                           write_tokenizer)

QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056  # Qwen2.5-VL's preprocessor_config.json
INSTRUCTION = "Replace the tabby cat on the sofa with a red fox, keeping its pose and the lighting."
REQUIREMENT = "Only the animal changes; the sofa, the cushions and the room stay exactly as they are."
SIZES = {
    "tiny": dict(),
    "small": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
                  vision=dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048)),
}


def write_tokenizer_for_prompt(folder):
  """A BPE trained on the judging text itself: about one token per word, as Qwen2's 151k vocabulary
  gives for plain English, so the text part of the sequence has a realistic length."""
  corpus = mllm.JudgePrompt.from_file().format(INSTRUCTION, REQUIREMENT)
  return write_tokenizer(folder, bpe_size=2000, corpus=corpus)


def write_folder(folder, size):
  from transformers import Qwen2_5_VLForConditionalGeneration
  ids = write_tokenizer_for_prompt(folder)
  write_preprocessor_config(folder, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
  torch.manual_seed(0)
  model = Qwen2_5_VLForConditionalGeneration(tiny_config(ids, **SIZES[size])).eval()
  model.save_pretrained(folder)
  return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()


def reference_scorer(model, folder):
  """transformers end to end on a left-padded batch: the same formula on its digit logits."""
  from transformers import AutoTokenizer
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  tokenizer = AutoTokenizer.from_pretrained(folder)
  image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
  prompt = mllm.JudgePrompt.from_file()
  digits = [tokenizer.convert_tokens_to_ids(d) for d in mllm.DIGITS]

  def score(sources, edits):
    images = image_processor([im for pair in zip(sources, edits) for im in pair])
    grids = images["image_grid_thw"].tolist()
    rows = [reference_chat_ids(tokenizer, prompt.format(INSTRUCTION, REQUIREMENT), grids[2 * i:2 * i + 2])
            for i in range(len(sources))]
    input_ids, mask, _ = proc.pad_left([np.asarray(r) for r in rows])
    input_ids, mask = torch.from_numpy(input_ids).long(), torch.from_numpy(mask).long()
    with torch.no_grad():
      logits = model(input_ids=input_ids, attention_mask=mask,
                     mm_token_type_ids=(input_ids == model.config.image_token_id).int(),
                     pixel_values=torch.from_numpy(images["pixel_values"]),
                     image_grid_thw=torch.from_numpy(images["image_grid_thw"]), logits_to_keep=1).logits
    p = torch.softmax(logits[:, -1, digits].double(), -1)
    return (p @ torch.arange(6, dtype=torch.float64) / 5).numpy()

  return score


def bench(size, pairs, side, repeats):
  sources = [random_image(side, side, seed=2 * i) for i in range(pairs)]
  edits = [random_image(side, side, seed=2 * i + 1) for i in range(pairs)]
  with tempfile.TemporaryDirectory() as folder:
    ref_model = write_folder(folder, size)
    judge = mllm.MllmJudge(folder, batch_size=pairs, length_multiple=1)
    ref = reference_scorer(ref_model, folder)
    ours_scores = judge.score(sources, edits, [INSTRUCTION] * pairs, [REQUIREMENT] * pairs).scores
    ref_scores = ref(sources, edits)
    err = float(np.abs(ours_scores - ref_scores).max() / np.abs(ref_scores).max())
    tokens = len(judge.encode_pair(sources[0], edits[0], INSTRUCTION, REQUIREMENT)[0])
    t_ref = median_ms(lambda: ref(sources, edits), repeats=repeats)
    t_ours = median_ms(lambda: judge.score(sources, edits, [INSTRUCTION] * pairs, [REQUIREMENT] * pairs),
                       repeats=repeats)
    params = sum(p.numel() for p in ref_model.parameters())
  return (size, f"{params / 1e6:.1f}M", pairs, f"{side}x{side}", tokens, t_ours, t_ref, t_ours / t_ref, f"{err:.1e}")


def tokens_at_512():
  """One pair of 512x512 images under the real bounds; text counted as in `write_tokenizer_for_prompt`."""
  cfg = proc.ImageProcessorConfig(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
  height, width = proc.smart_resize(512, 512, cfg.factor, cfg.min_pixels, cfg.max_pixels)
  per_image = cfg.num_tokens((1, height // cfg.patch_size, width // cfg.patch_size))
  with tempfile.TemporaryDirectory() as folder:
    write_tokenizer_for_prompt(folder)
    chat = proc.ChatFormatter(folder, cfg)
    text = mllm.JudgePrompt.from_file().format(INSTRUCTION, REQUIREMENT)
    grid = (1, height // cfg.patch_size, width // cfg.patch_size)
    total = len(chat.encode(text, [grid, grid]))
  print(f"tokens per pair at 512x512 (min_pixels {QWEN_MIN_PIXELS}, max_pixels {QWEN_MAX_PIXELS}): resized to "
        f"{height}x{width}, {per_image} image tokens per image, {2 * per_image} for the pair; {total} in all with the "
        f"chat template and a {len(text)}-character judging text ({total - 2 * per_image} text and marker tokens, "
        "counted with a BPE of about one token per word)")


def main():
  parser = arguments("tiny,small", repeats=3)
  parser.add_argument("--pairs", type=int, default=2)
  parser.add_argument("--image", type=int, default=224, help="side of the square source and edited images")
  args = parser.parse_args()
  same_footing()
  rows = [bench(size, args.pairs, args.image, args.repeats) for size in args.sizes.split(",")]
  print(f"device: {jax.devices()[0].device_kind}, float32, torch {torch.__version__} eager, jax {jax.__version__} jit; "
        "both end to end (image processing, chat template, prefill, digit softmax)")
  print_table(("size", "params", "pairs", "images", "tokens/pair", "ours ms", "transformers ms", "ours/reference",
               "score rel err"), rows)
  tokens_at_512()
  print(f"reward_prefill ours/reference time ratio: {rows[-1][7]:.3f}")


if __name__ == "__main__":
  main()
