"""Batched text generation with Qwen2.5-VL and a KV cache: greedy, or sampled at a temperature.

One jitted call per (batch shape, image grids, settings): the prefill runs the vision tower and the
left-padded prompts once and fills a preallocated `qwen2_5_vl.KVCache`; a `lax.scan` of
max_new_tokens - 1 single-token steps then decodes without leaving the device. A row stops at its
first EOS: its later tokens are `pad_token_id` (fed back, as transformers' `generate` does) and
`lengths` counts its tokens up to and including that EOS.

M-RoPE: the k-th generated token of a row sits at position max(prompt positions) + 1 + k on all three
axes. That is transformers' cached forward: the text position (valid tokens + k) plus the row's
rope_deltas (max + 1 - valid tokens) from the prefill's `get_rope_index`.

Buckets (`chat_batch(..., buckets=q)`): every shape of the batch is rounded up to one of q sizes per octave
(`bucket`), so that prompts of many lengths and image sizes share a few compiles: the prompts are left-padded further,
blank patches appended to the packed images in groups of their own (their features are never scattered into the
prompt), and the vision tower's windows and frames padded with such groups. A real token sees what it saw unpadded.
"""

import functools
import json
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editr1_jax import paths
from editr1_jax import sharding as shd
from editr1_jax.models import qwen2_5_vl as qv
from editr1_jax.reward import processor as proc


class Generation(NamedTuple):
  token_ids: jax.Array  # (B, N) int32; pad_token_id after a row's EOS
  lengths: jax.Array  # (B,) int32: tokens up to and including the first EOS, N without one
  logits: jax.Array | None  # (B, N, V) float32 each step's logits, when asked for


def generate(model: qv.Qwen25VL, batch: qv.Batch, *, max_new_tokens: int, eos_token_ids: Sequence[int],
             pad_token_id: int | None = None, temperature: float = 0.0, keys: jax.Array | None = None,
             return_logits: bool = False, mesh=None, rules=shd.DEFAULT_RULES) -> Generation:
  """`max_new_tokens` tokens for each row of a left-padded `prepare_batch` result (`chat_batch`).

  temperature 0 is greedy (the first of equal maxima, as torch.argmax); above 0, row b samples step k from
  fold_in(keys[b], k), so a row's tokens depend on its own key only. `pad_token_id` defaults to the first EOS
  (transformers' default). With `mesh`, rows split over data x fsdp like the prefill (the model placed by
  `load_qwen2_5_vl(..., mesh=mesh)`). The settings are static: one compile per value."""
  mask = shd.to_host(batch.attention_mask).astype(bool)
  rows, vocab = mask.shape[0], model.cfg.vocab_size
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  eos = tuple(int(t) for t in eos_token_ids)
  if not eos:
    raise ValueError("eos_token_ids is empty: rows need a token to stop at")
  pad = eos[0] if pad_token_id is None else int(pad_token_id)
  if not all(0 <= t < vocab for t in eos + (pad,)):
    raise ValueError(f"eos_token_ids {list(eos)} / pad_token_id {pad} must lie in [0, vocab_size {vocab})")
  if not mask[:, -1].all():
    raise ValueError(f"rows {np.flatnonzero(~mask[:, -1]).tolist()} end in padding: generation needs left-padded "
                     "prompts (processor.pad_left)")
  if temperature < 0 or (temperature > 0) != (keys is not None):
    raise ValueError(f"temperature {temperature} with keys {'given' if keys is not None else 'None'}: greedy "
                     "(temperature 0) takes no keys, sampling (temperature > 0) one key per row")
  if keys is not None:
    if keys.shape != (rows,):
      raise ValueError(f"keys must be one typed key per row, shape ({rows},), got {keys.shape}")
    keys = jax.random.wrap_key_data(shd.put_rows(jax.random.key_data(keys), mesh, rules))
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, qv.place_batch(batch, mesh, rules), keys, max_new_tokens=max_new_tokens,
                   eos_token_ids=eos, pad_token_id=pad, temperature=float(temperature), return_logits=return_logits,
                   mesh=mesh, rules=tuple(rules))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_token_ids", "pad_token_id",
                                             "temperature", "return_logits", "mesh", "rules"))
def _generate(graphdef, state, batch: qv.Batch, keys, *, max_new_tokens, eos_token_ids, pad_token_id, temperature,
              return_logits, mesh, rules) -> Generation:
  model = nnx.merge(graphdef, state)
  text = model.language_model
  rows, length = batch.input_ids.shape
  eos = jnp.asarray(eos_token_ids, jnp.int32)

  def pick(logits, step, done):
    """The next token of every row (pad where done already), and which rows are done after it."""
    if temperature == 0:
      token = jnp.argmax(logits, axis=-1)
    else:
      sample = lambda key, z: jax.random.categorical(jax.random.fold_in(key, step), z / temperature)
      token = jax.vmap(sample)(keys, logits)
    token = jnp.where(done, pad_token_id, token).astype(jnp.int32)
    return token, done | jnp.isin(token, eos)

  with shd.use_mesh(mesh, rules):
    cache = qv.KVCache.empty(rows, length + max_new_tokens - 1, model.cfg)
    key_mask = jnp.concatenate([batch.attention_mask.astype(bool), jnp.ones((rows, max_new_tokens - 1), bool)], 1)
    key_mask = shd.constrain(key_mask, ("batch", "seq"))
    start = batch.position_ids.max(axis=(0, 2)) + 1  # (B,): valid tokens + rope_deltas (module docstring)
    hidden, cache = text(model.embed(batch), key_mask, batch.position_ids, cache)
    logits = model.project(hidden[:, -1:])[:, 0]
    token, done = pick(logits, 0, jnp.zeros(rows, bool))

    def step(carry, k):
      """Feeds generated token k - 1, picks token k. The model's Variables are copied into the loop's trace:
      nnx.remat (config.remat) writes back to the modules it runs, which the outer trace's would refuse."""
      model = nnx.merge(graphdef, state, copy=True)
      text = model.language_model
      cache, token, done, lengths = carry
      positions = jnp.broadcast_to((start + k - 1)[None, :, None], (3, rows, 1))
      hidden, cache = text(text.embed_tokens(token[:, None]), key_mask, positions, cache)
      logits = model.project(hidden)[:, 0]
      lengths = lengths + ~done
      token, done = pick(logits, k, done)
      return (cache, token, done, lengths), (token, logits if return_logits else None)

    carry = (cache, token, done, jnp.ones(rows, jnp.int32))
    (_, _, _, lengths), (tokens, step_logits) = jax.lax.scan(step, carry, jnp.arange(1, max_new_tokens))
  token_ids = jnp.concatenate([token[:, None], tokens.T], axis=1)
  if return_logits:
    step_logits = jnp.concatenate([logits[:, None], jnp.moveaxis(step_logits, 0, 1)], axis=1)
  return Generation(token_ids, lengths, step_logits)


# --------------------------------------------------------------------------------------------------
def chat_batch(chat: proc.ChatFormatter, prompts: Sequence[tuple], cfg: qv.Qwen25VLConfig, pad_id: int = 0,
               buckets: int | None = None) -> qv.Batch:
  """One user turn per prompt, (images, text) or (images, text, text_first): its images in order, then its text
  (or the text first), in the folder's chat template; the token rows left-padded to one length, the longest row's or,
  with `buckets`, its bucket (and the images' shapes bucketed too: module docstring). Images are PIL images or uint8
  (H, W, 3) arrays."""
  rows, pixels, grids = [], [], []
  for i, (images, text, *order) in enumerate(prompts):
    try:
      pixel_values, grid = proc.preprocess_images(images, chat.image_cfg)
      rows.append(chat.encode(text, grid.tolist(), text_first=bool(order and order[0])))
    except proc.ProcessorError as e:
      raise proc.ProcessorError(f"prompt {i} ({text!r:.60}): {e}") from e
    pixels.append(pixel_values)
    grids.append(grid)
  length = None if buckets is None else bucket(max(len(r) for r in rows), buckets)
  input_ids, mask, _ = proc.pad_left(rows, length, pad_id=pad_id)
  batch = qv.prepare_batch(input_ids, mask, np.concatenate(pixels), np.concatenate(grids), cfg)
  return batch if buckets is None else _pad_images(batch, buckets, cfg.vision)


def bucket(n: int, per_octave: int) -> int:
  """n rounded up to a multiple of 2^floor(log2 n) / per_octave: per_octave sizes per octave, less than 1 / per_octave
  of the size wasted."""
  if per_octave < 1:
    raise ValueError(f"buckets per octave must be at least 1, got {per_octave}")
  step = max(1, (1 << (n.bit_length() - 1)) // per_octave)
  return -(-n // step) * step


def _pad_images(batch: qv.Batch, per_octave: int, vcfg: qv.VisionConfig) -> qv.Batch:
  """The packed patches bucketed in merged units: blank units appended in window order, in windows (full-sized) and
  frames (of the bucketed frame size) of their own; empty windows fill the window count."""
  layout, unit = batch.vision, vcfg.merge_unit
  n = batch.pixel_values.shape[0]
  total = bucket(n // unit, per_octave) * unit
  window = vcfg.window_units**2 * unit
  frame = bucket(layout.frames.index.shape[1] // unit, per_octave) * unit
  blank = total - n
  extra = lambda size: max(1, -(-blank // size))  # groups of blank units, at least one: no bucket edge at blank 0
  # At least twice the windows the units fill whole: images with sides of 2.5 windows or more (270 pixels for 112-pixel
  # windows) hardly ever need more, so the count follows the units' bucket instead of adding a dimension of buckets.
  count = max(bucket(len(layout.windows.index) + extra(window), per_octave), 2 * total // window)
  windows = _pad_groups(layout.windows, n, total, window, count)
  frames = _pad_groups(layout.frames, n, total, frame, bucket(len(layout.frames.index) + extra(frame), per_octave))
  units = np.arange(n // unit, total // unit, dtype=np.int32)
  vision = layout.replace(window_index=np.concatenate([layout.window_index, units]),
                          reverse_index=np.concatenate([layout.reverse_index, units]),
                          rope_positions=np.concatenate([layout.rope_positions, np.zeros((blank, 2), np.int32)]),
                          windows=windows, frames=frames)
  pixel_values = np.concatenate([batch.pixel_values, np.zeros((blank, vcfg.patch_dim), batch.pixel_values.dtype)])
  return batch.replace(pixel_values=pixel_values, vision=vision)


def _pad_groups(groups: qv.Groups, n: int, total: int, size: int, count: int) -> qv.Groups:
  """(G, S) groups of tokens [0, n) -> (count, size) groups of tokens [0, total): the tokens from n on in groups of
  `size` after the real ones, then empty groups (no valid key: what they compute is never read back)."""
  rows, width = groups.index.shape
  index, valid = np.zeros((count, size), np.int32), np.zeros((count, size), bool)
  index[:rows] = groups.index[:, :1]  # padding repeats a group's first token, as `groups_from_lengths`
  index[:rows, :width], valid[:rows, :width] = groups.index, groups.valid
  extra = np.arange(total - n)
  at_row, at_col = rows + extra // size, extra % size
  index[at_row, at_col], valid[at_row, at_col] = n + extra, True
  inverse = np.concatenate([groups.inverse // width * size + groups.inverse % width, at_row * size + at_col])
  return qv.Groups(index, valid, inverse.astype(np.int32))


def stop_tokens(folder: str) -> tuple[tuple[int, ...], int]:
  """(EOS ids, pad id) of a model folder as transformers' `generate` reads them: `generation_config.json`, else
  config.json (its `text_config` too); the pad id defaults to the first EOS."""
  sources = [paths.join(folder, "generation_config.json"), paths.join(folder, "config.json")]
  for path in sources:
    if not paths.isfile(path):
      continue
    try:
      config = json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON: {e}") from e
    for section, where in ((config, ""), (config.get("text_config") or {}, "text_config.")):
      eos = section.get("eos_token_id")
      if eos is None:
        continue
      eos = eos if isinstance(eos, list) else [eos]
      pad = section.get("pad_token_id")
      pad = eos[0] if pad is None and eos else pad
      if not eos or not all(_is_id(t) for t in eos + [pad]):
        raise ValueError(f"{path}: field {where}eos_token_id {section['eos_token_id']!r} / pad_token_id "
                         f"{section.get('pad_token_id')!r}: token ids must be non-negative integers")
      return tuple(eos), pad
  raise ValueError(f"{folder}: no eos_token_id in {' or '.join(paths.basename(p) for p in sources)}")


def _is_id(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0
