"""An open MLLM judge for the benchmarks: any Qwen2.5-VL folder (transformers layout) answering each benchmark
query by greedy generation (`editr1_jax.generation`), sharded over the mesh like the reward's prefill."""

from typing import Sequence

import numpy as np
from PIL import Image

from editr1_jax import chunks, generation
from editr1_jax import sharding as shd
from editr1_jax.models import qwen2_5_vl
from editr1_jax.reward import processor


class QwenJudge:
  """`answer(requests)`: (prompt, images in order, text first?) per request -> the generated answers, in batches of
  `batch_size` (padded to it).

  Each batch's shapes are rounded up to one of `buckets_per_octave` sizes per octave (`generation.bucket`; None: exact
  shapes), so a benchmark's prompts and image sizes share a few compiles of the generation (35-185 s each for a 7B-32B
  judge) instead of one each. The answers are the unpadded prompts' up to rounding (in bfloat16 a near tie late in a
  long answer may flip, as another batch companion's padding can). The default 2 pads a prompt by less than half (a
  fifth on average), cheap beside the decoding steps after its prefill. `min_pixels` / `max_pixels` replace the
  folder's image bounds (a judge may recommend its own: ImgEdit-Judge 1016064 / 1354752)."""

  def __init__(self, folder: str, *, max_new_tokens: int = 512, batch_size: int = 1, dtype: str = "bfloat16",
               mesh=None, rules=shd.DEFAULT_RULES, attention_impl: str = "auto", min_pixels: int | None = None,
               max_pixels: int | None = None, buckets_per_octave: int | None = 2):
    given = {"min_pixels": min_pixels, "max_pixels": max_pixels, "buckets_per_octave": buckets_per_octave}
    for name, value in given.items():
      if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    try:
      image_cfg = processor.ImageProcessorConfig.from_folder(folder).with_pixels(min_pixels, max_pixels)
    except processor.ProcessorError as e:
      raise ValueError(f"{'min_pixels' if min_pixels is not None else 'max_pixels'}: {e} (given or the folder's)")
    bounds = {"min_pixels": image_cfg.min_pixels, "max_pixels": image_cfg.max_pixels}
    self.chat = processor.ChatFormatter(folder, image_cfg)
    self.eos, self.pad = generation.stop_tokens(folder)
    self.model = qwen2_5_vl.load_qwen2_5_vl(folder, dtype=dtype, mesh=mesh, rules=rules, attention_impl=attention_impl)
    self.max_new_tokens, self.batch_size, self.mesh, self.rules = max_new_tokens, batch_size, mesh, rules
    self.buckets = buckets_per_octave
    self._settings = {"folder": folder, **bounds, "max_new_tokens": max_new_tokens, "dtype": dtype,
                      "batch_size": batch_size, "buckets_per_octave": buckets_per_octave, "decoding": "greedy"}

  @property
  def settings(self) -> dict:
    """How this judge judges (JSON-able), for a result to record beside its scores."""
    return dict(self._settings)

  def answer(self, requests: Sequence[tuple[str, Sequence[Image.Image], bool]]) -> list[str]:
    answers = []
    for idx, real in chunks.padded_chunks(len(requests), self.batch_size):  # repeated rows: generated, then dropped
      batch = generation.chat_batch(self.chat, [(requests[i][1], requests[i][0], requests[i][2]) for i in idx],
                                    self.model.cfg, pad_id=self.pad, buckets=self.buckets)
      out = generation.generate(self.model, batch, max_new_tokens=self.max_new_tokens, eos_token_ids=self.eos,
                                pad_token_id=self.pad, mesh=self.mesh, rules=self.rules)
      ids, lengths = shd.to_host(out.token_ids), shd.to_host(out.lengths)
      answers += [self.chat.tokenizer.decode(np.asarray(ids[i, :lengths[i]]).tolist(), skip_special_tokens=True)
                  for i in range(real)]
    return answers
