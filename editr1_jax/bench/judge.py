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
  `batch_size` (padded to it: one compile)."""

  def __init__(self, folder: str, *, max_new_tokens: int = 512, batch_size: int = 1, dtype: str = "bfloat16",
               mesh=None, rules=shd.DEFAULT_RULES, attention_impl: str = "auto"):
    self.chat = processor.ChatFormatter(folder, processor.ImageProcessorConfig.from_folder(folder))
    self.eos, self.pad = generation.stop_tokens(folder)
    self.model = qwen2_5_vl.load_qwen2_5_vl(folder, dtype=dtype, mesh=mesh, rules=rules, attention_impl=attention_impl)
    self.max_new_tokens, self.batch_size, self.mesh, self.rules = max_new_tokens, batch_size, mesh, rules

  def answer(self, requests: Sequence[tuple[str, Sequence[Image.Image], bool]]) -> list[str]:
    answers = []
    for idx, real in chunks.padded_chunks(len(requests), self.batch_size):  # repeated rows: generated, then dropped
      batch = generation.chat_batch(self.chat, [(requests[i][1], requests[i][0], requests[i][2]) for i in idx],
                                    self.model.cfg, pad_id=self.pad)
      out = generation.generate(self.model, batch, max_new_tokens=self.max_new_tokens, eos_token_ids=self.eos,
                                pad_token_id=self.pad, mesh=self.mesh, rules=self.rules)
      ids, lengths = shd.to_host(out.token_ids), shd.to_host(out.lengths)
      answers += [self.chat.tokenizer.decode(np.asarray(ids[i, :lengths[i]]).tolist(), skip_special_tokens=True)
                  for i in range(real)]
    return answers
