"""Prompt conditioning for FLUX.1-Kontext, as diffusers' `FluxKontextPipeline.encode_prompt` computes it.

Tokenisation: CLIP's tokenizer (tokenizer/) pads and truncates to its model_max_length (77); T5's
(tokenizer_2/) to `max_sequence_length` (512 at inference, 128 in the paper's training). Encoding:
the CLIP pooled output and the T5 last hidden states, in one jitted call whose activations follow
the sharding rules; text position ids are all zero.
"""

import functools
import json
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from editr1_jax import paths
from editr1_jax import sharding as shd
from editr1_jax.models.clip import CLIPTextModel, load_clip_text
from editr1_jax.models.t5 import T5EncoderModel, load_t5_encoder

_LOG = logging.getLogger(__name__)
# The pipeline refuses longer T5 sequences (FluxKontextPipeline.check_inputs).
MAX_T5_LENGTH = 512


def load_tokenizers(folder: str):
  """(CLIP tokenizer, T5 tokenizer) from a pipeline folder's tokenizer/ and tokenizer_2/ (in a bucket: from a local
  copy of those folders, which transformers needs).

  The concrete transformers classes, not AutoTokenizer: the auto classes import torch.
  """
  from transformers.models.clip.tokenization_clip import CLIPTokenizer
  from transformers.models.t5.tokenization_t5 import T5Tokenizer
  folders = [paths.join(folder, sub) for sub in ("tokenizer", "tokenizer_2")]
  for path in folders:
    if not paths.isdir(path):
      raise FileNotFoundError(f"{path}: tokenizer folder not found")
  return (CLIPTokenizer.from_pretrained(paths.local_copy(folders[0])),
          T5Tokenizer.from_pretrained(paths.local_copy(folders[1])))


def _prompt_list(prompts: str | Sequence[str], what: str) -> list[str]:
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    raise ValueError(f"{what}: no prompts given")
  bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
  if bad:
    raise TypeError(f"{what}: prompts at positions {bad} are not strings")
  return prompts


def _start(prompt: str, chars: int = 40) -> str:
  """The prompt's first `chars` characters, quoted."""
  return json.dumps(prompt[:chars] + ("..." if len(prompt) > chars else ""), ensure_ascii=False)


def _tokenize(tokenizer, prompts: list[str], max_length: int, what: str) -> np.ndarray:
  """Padded to max_length and truncated, as the pipeline calls the tokenizer; warns like it on truncation."""
  ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_length=False,
                  return_overflowing_tokens=False, return_tensors="np")["input_ids"]
  full = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
  cut = [_start(p) for p, row in zip(prompts, full) if len(row) > max_length]
  if cut:  # the instruction's start finds it in a dataset; a batch position does not
    _LOG.warning("%s: %d prompt(s) truncated to %d tokens: %s", what, len(cut), max_length, ", ".join(cut))
  return ids.astype(np.int32)


def tokenize_clip(tokenizer, prompts: str | Sequence[str]) -> np.ndarray:
  """(B, tokenizer.model_max_length) int32 ids, end-of-text padded."""
  return _tokenize(tokenizer, _prompt_list(prompts, "CLIP"), tokenizer.model_max_length, "CLIP")


def tokenize_t5(tokenizer, prompts: str | Sequence[str], max_sequence_length: int = MAX_T5_LENGTH) -> np.ndarray:
  """(B, max_sequence_length) int32 ids, `<pad>` padded."""
  if not 0 < max_sequence_length <= MAX_T5_LENGTH:
    raise ValueError(f"max_sequence_length must be in [1, {MAX_T5_LENGTH}], got {max_sequence_length}")
  return _tokenize(tokenizer, _prompt_list(prompts, "T5"), max_sequence_length, "T5")


# jax.jit, not nnx.jit: nnx.jit re-walks the module graph on every call (measured +190 ms a call for CLIP-L).
@functools.partial(jax.jit, static_argnames=("mesh", "rules"))
def encode_prompts(clip: CLIPTextModel, t5: T5EncoderModel, clip_ids: jax.Array, t5_ids: jax.Array, *,
                   mesh=None, rules=shd.DEFAULT_RULES) -> tuple[jax.Array, jax.Array, jax.Array]:
  """-> (T5 hidden states (B, L, d_t5), CLIP pooled (B, d_clip), txt_ids (L, 3) zeros).

  Like diffusers' Flux pipelines, T5 runs without an attention mask: the padding tokens are attended
  to and their outputs are part of the conditioning. txt_ids are float32 (the pipeline uses the text
  encoder's dtype; the values are zeros either way).
  """
  with shd.use_mesh(mesh, rules):
    _, pooled = clip(clip_ids)
    hidden = t5(t5_ids)
  return hidden, pooled, jnp.zeros((t5_ids.shape[1], 3), jnp.float32)


class TextEncoders:
  """Both tokenizers and both encoders of a pipeline folder: prompts in, FLUX conditioning out."""

  def __init__(self, clip_tokenizer, t5_tokenizer, clip: CLIPTextModel, t5: T5EncoderModel, *,
               max_sequence_length: int = MAX_T5_LENGTH, mesh=None, rules=shd.DEFAULT_RULES):
    if not 0 < max_sequence_length <= MAX_T5_LENGTH:
      raise ValueError(f"max_sequence_length must be in [1, {MAX_T5_LENGTH}], got {max_sequence_length}")
    self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
    self.clip, self.t5 = clip, t5
    self.max_sequence_length = max_sequence_length
    self.mesh, self.rules = mesh, tuple(rules)

  @classmethod
  def from_pipeline(cls, folder: str, *, dtype: str = "float32", max_sequence_length: int = MAX_T5_LENGTH,
                    mesh=None, rules=shd.DEFAULT_RULES, attention_impl: str = "auto") -> "TextEncoders":
    clip_tokenizer, t5_tokenizer = load_tokenizers(folder)
    clip = load_clip_text(folder, dtype=dtype, mesh=mesh, rules=rules, attention_impl=attention_impl)
    t5 = load_t5_encoder(folder, dtype=dtype, mesh=mesh, rules=rules, attention_impl=attention_impl)
    return cls(clip_tokenizer, t5_tokenizer, clip, t5, max_sequence_length=max_sequence_length, mesh=mesh,
               rules=rules)

  def tokenize(self, prompts: str | Sequence[str],
               prompts_2: str | Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP ids, T5 ids); `prompts_2` goes to T5 (default: `prompts`), as the pipeline's `prompt_2`."""
    return (tokenize_clip(self.clip_tokenizer, prompts),
            tokenize_t5(self.t5_tokenizer, prompts if prompts_2 is None else prompts_2, self.max_sequence_length))

  def __call__(self, prompts: str | Sequence[str],
               prompts_2: str | Sequence[str] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    clip_ids, t5_ids = self.tokenize(prompts, prompts_2)
    if len(clip_ids) != len(t5_ids):
      raise ValueError(f"{len(clip_ids)} CLIP prompts but {len(t5_ids)} T5 prompts")
    return encode_prompts(self.clip, self.t5, clip_ids, t5_ids, mesh=self.mesh, rules=self.rules)
