"""Text encoders: our jitted CLIP (77 tokens) and T5 (128 tokens, the paper's training length) vs transformers eager.

  python benchmarks/text_encoders.py [--sizes tiny,small] [--repeats 5] [--batch 1]

Same random weights (saved by transformers, read by our loader) and ids in both. "small" is CLIP-L
itself (123M) and a T5 v1.1 at 1024 wide (16 heads of 64, d_ff 2816, 4 layers); "xxl" is T5-XXL's
width (4096, 64 heads, d_ff 10240) with 2 of its 24 layers. The last line is the T5 ratio of the last size.
"""

import os
import sys
import tempfile

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import arguments, median_ms, print_table, same_footing  # noqa: E402
from editr1_jax.models import clip, t5  # noqa: E402

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, eos_token_id=2)
SIZES = {
    "tiny": dict(clip=dict(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=77, eos_token_id=2),
                 t5=dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)),
    "small": dict(clip=CLIP_L, t5=dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=4, num_heads=16)),
    "xxl": dict(clip=CLIP_L, t5=dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64)),
}
T5_TOKENS, CLIP_TOKENS = 128, 77


def reference_models(spec):
  from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
  torch.manual_seed(0)
  ref_clip = CLIPTextModel(CLIPTextConfig(**spec["clip"])).eval()
  ref_t5 = T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", **spec["t5"])).eval()
  with tempfile.TemporaryDirectory() as d:
    ref_clip.save_pretrained(os.path.join(d, "text_encoder"))
    ref_t5.save_pretrained(os.path.join(d, "text_encoder_2"))
    ours_clip, ours_t5 = clip.load_clip_text(d), t5.load_t5_encoder(d)
  return (ref_clip, ours_clip), (ref_t5, ours_t5)


def bench(size, repeats, batch):
  spec = SIZES[size]
  (ref_clip, ours_clip), (ref_t5, ours_t5) = reference_models(spec)
  rng = np.random.default_rng(0)
  clip_ids = rng.integers(0, spec["clip"]["vocab_size"] - 1, (batch, CLIP_TOKENS))
  clip_ids[:, 20] = spec["clip"]["vocab_size"] - 1  # end-of-text, the highest id
  t5_ids = rng.integers(2, spec["t5"]["vocab_size"], (batch, T5_TOKENS))
  t_clip, t_t5 = torch.from_numpy(clip_ids), torch.from_numpy(t5_ids)
  clip_fn = jax.jit(lambda m, x: m(x)[1])  # as conditioning.encode_prompts calls them
  t5_fn = jax.jit(lambda m, x: m(x))
  rows = []
  with torch.no_grad():
    for name, ref, ours, fn, ids, t_ids in (("CLIP 77", ref_clip, ours_clip, clip_fn, clip_ids, t_clip),
                                            ("T5 128", ref_t5, ours_t5, t5_fn, t5_ids, t_t5)):
      t_ref = median_ms(lambda: ref(t_ids), repeats=repeats)
      t_ours = median_ms(lambda: fn(ours, ids), repeats=repeats, block=jax.block_until_ready)
      rows.append((size, name, t_ours, t_ref, t_ours / t_ref))
  return rows


def main():
  parser = arguments("tiny,small", repeats=5)
  parser.add_argument("--batch", type=int, default=1)
  args = parser.parse_args()
  same_footing()
  sizes = args.sizes.split(",")
  rows = [r for size in sizes for r in bench(size, args.repeats, args.batch)]
  print(f"device: {jax.devices()[0].device_kind}, float32, batch {args.batch}, "
        f"torch {torch.__version__} eager (cpu), jax {jax.__version__} jit")
  print_table(("size", "work", "ours ms", "transformers ms", "ours/reference"), rows)
  ratio = [r for r in rows if r[0] == sizes[-1] and r[1].startswith("T5")][0][4]
  print(f"text_encoders ours/reference time ratio: {ratio:.3f}")


if __name__ == "__main__":
  main()
