"""The MLLM logit reward (docs/METHOD.md section 4): Qwen2.5-VL judges (source, edit, instruction,
requirement) in one prefill; the reward is the expected digit, sum_k k * softmax(z_"0".."z_"5")_k / 5,
read at the first answer position.

Scoring is its own jitted step (never fused with a policy step). Pairs are grouped by their two image
sizes so every call has static shapes: the batch is padded to `batch_size` (a smaller remainder to a
power of two) and the sequence, padded on the left, to a multiple of `length_multiple`. A sample whose
digit logits or score are not finite is masked: its score and probabilities are NaN, `valid` is False
and it is counted; it never becomes a 0 reward.
"""

import dataclasses
import functools
import os
import string
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from editr1_jax import paths, preemption
from editr1_jax import sharding as shd
from editr1_jax.models import qwen2_5_vl
from editr1_jax.reward import processor as proc
from editr1_jax.reward.base import RewardResult, register  # RewardResult: scores (N,) in [0, 1], probs (N, 6)

DIGITS = tuple(str(k) for k in range(6))
PLACEHOLDERS = ("instruction", "requirement")
DEFAULT_PROMPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "judge_prompt.txt")


class TemplateError(ValueError):
  """A judging prompt template is unusable; the message names its file."""


# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class JudgePrompt:
  """The judging text with `{instruction}` and `{requirement}` placeholders (str.format syntax)."""

  text: str
  source: str

  @classmethod
  def from_file(cls, path: str | None = None) -> "JudgePrompt":
    """`path` (a file or a gs:// URL), or the packaged `judge_prompt.txt`. Trailing whitespace of the file is
    dropped."""
    path = DEFAULT_PROMPT if path is None else path
    try:
      with paths.open(path, encoding="utf-8") as f:
        text = f.read().rstrip()
    except (OSError, UnicodeDecodeError) as e:
      raise TemplateError(f"{path}: cannot read the judging prompt: {e}") from e
    return cls.validated(text, path)

  @classmethod
  def validated(cls, text: str, source: str) -> "JudgePrompt":
    try:
      fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as e:
      raise TemplateError(f"{source}: malformed placeholder ({e}); write literal braces as {{{{ and }}}}") from e
    unknown = sorted({name for name, _, _ in fields if name not in PLACEHOLDERS})
    if unknown:
      raise TemplateError(f"{source}: unknown placeholder(s) {unknown}; allowed: {list(PLACEHOLDERS)}")
    missing = [p for p in PLACEHOLDERS if p not in {name for name, _, _ in fields}]
    if missing:
      raise TemplateError(f"{source}: missing placeholder(s) {['{' + p + '}' for p in missing]}")
    if any(spec or conv for _, spec, conv in fields):
      raise TemplateError(f"{source}: placeholders take no format spec or conversion")
    return cls(text, source)

  def format(self, instruction: str, requirement: str) -> str:
    return self.text.format(instruction=instruction, requirement=requirement)


# --------------------------------------------------------------------------------------------------
def digit_scores(digit_logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(B, 6) logits of "0".."5" -> score (B,), probabilities (B, 6), valid (B,), in float32.
  Invalid rows (a non-finite logit or score) hold NaN, never a number that looks like a reward."""
  z = digit_logits.astype(jnp.float32)
  probs = jax.nn.softmax(z, axis=-1)
  score = probs @ (jnp.arange(len(DIGITS), dtype=jnp.float32) / (len(DIGITS) - 1))
  valid = jnp.isfinite(z).all(axis=-1) & jnp.isfinite(score)
  return jnp.where(valid, score, jnp.nan), jnp.where(valid[:, None], probs, jnp.nan), valid


def score_step(graphdef, digit_ids, mesh, rules, state, batch, positions):
  """The judge's device step (what `MllmJudge` jits, with the first four bound): the prefill of a prepared
  `qwen2_5_vl.Batch`, the logits at `positions` (B, 1) (the first answer position) -> `digit_scores` of the
  `digit_ids` (6,) columns. `launch/plan.py` compiles this same function."""
  model = nnx.merge(graphdef, state)
  with shd.use_mesh(mesh, rules):
    logits = model.logits_at_batch(batch, positions)[:, 0]  # (B, V) at the first answer position
  return digit_scores(logits[:, digit_ids])


def _bucket(n: int, batch_size: int, multiple: int) -> int:
  """Rows of one call: `batch_size`, or the remainder rounded up to a power of two; a multiple of the
  data-parallel width so the batch splits evenly."""
  rows = min(batch_size, 1 << (n - 1).bit_length())
  return -(-rows // multiple) * multiple


class MllmJudge:
  """Qwen2.5-VL as a training-free reward model, loaded from one transformers folder (weights,
  tokenizer, chat template, preprocessor_config.json)."""

  def __init__(self, folder: str, *, template_file: str | None = None, dtype: str = "float32", mesh=None,
               rules=shd.DEFAULT_RULES, batch_size: int = 8, length_multiple: int = 64, model=None,
               offload: bool = False, attention_impl: str = "auto"):
    """`model`: an already loaded model (anything with `cfg` and `logits_at_batch`), else it is read from `folder`.
    `offload`: the weights wait in host memory (the same shardings, memory kind pinned_host) and come to the
    devices only for a `score` call, so the policy's steps have the accelerators' memory to themselves."""
    if batch_size < 1 or length_multiple < 1:
      raise ValueError(f"batch_size {batch_size} and length_multiple {length_multiple} must be positive")
    self.image_cfg = proc.ImageProcessorConfig.from_folder(folder)
    self.chat = proc.ChatFormatter(folder, self.image_cfg)
    self.prompt = JudgePrompt.from_file(template_file)
    self.digit_ids = np.asarray([self.chat.single_token_id(d) for d in DIGITS], np.int32)
    if model is None:
      model = qwen2_5_vl.load_qwen2_5_vl(folder, dtype=dtype, mesh=mesh, rules=rules, attention_impl=attention_impl)
    self.cfg = model.cfg
    self._check_agreement(folder)
    self.mesh, self.rules = mesh, rules
    self.batch_size, self.length_multiple = batch_size, length_multiple
    self._row_multiple = 1
    if mesh is not None:
      self._row_multiple = int(np.prod([mesh.shape[a] for a in _mesh_axes(rules, "batch")]))
    self._graphdef, self._state = nnx.split(model)
    self._step = jax.jit(functools.partial(score_step, self._graphdef, self.digit_ids, mesh, rules))
    self.offload = offload
    self._on_device = jax.tree.map(lambda x: x.sharding, self._state)
    if offload:
      self._state = jax.device_put(self._state, jax.tree.map(lambda s: s.with_memory_kind("pinned_host"),
                                                             self._on_device))

  @classmethod
  def tiny(cls, seed: int, batch_size: int, *, template_file: str | None = None, mesh=None, rules=shd.DEFAULT_RULES,
           offload: bool = False, attention_impl: str = "auto") -> "MllmJudge":
    """A random tiny Qwen2.5-VL drawn from `seed` with the shipped tiny tokenizer: every code path of the real
    judge, meaningless scores."""
    from editr1_jax import tiny  # every tiny model's code: loaded only when one is asked for
    model = tiny.tiny_judge_model(seed, mesh=mesh, rules=rules, attention_impl=attention_impl)
    return cls(os.path.join(tiny.ASSETS, "judge"), template_file=template_file, mesh=mesh, rules=rules,
               batch_size=batch_size, model=model, offload=offload)

  @property
  def memory_kinds(self) -> set[str]:
    """Where the weights are now (one memory kind per leaf)."""
    return {x.sharding.memory_kind for x in jax.tree.leaves(self._state)}

  def _check_agreement(self, folder: str) -> None:
    """The tokenizer, the preprocessor and config.json must describe the same model."""
    v = self.cfg.vision
    pairs = {"image_token_id": (self.cfg.image_token_id, self.chat.image_token_id),
             "vision_config.patch_size": (v.patch_size, self.image_cfg.patch_size),
             "vision_config.spatial_merge_size": (v.spatial_merge_size, self.image_cfg.merge_size),
             "vision_config.temporal_patch_size": (v.temporal_patch_size, self.image_cfg.temporal_patch_size)}
    bad = [f"{k} {ours} vs {theirs}" for k, (ours, theirs) in pairs.items() if ours != theirs]
    if bad:
      raise ValueError(f"{folder}: config.json disagrees with the tokenizer / preprocessor_config.json: {bad}")

  # ------------------------------------------------------------------------------------------------
  def encode_pair(self, source, edited, instruction: str, requirement: str):
    """(token ids, pixel_values (n, patch_dim), image_grid_thw (2, 3)) of one judged pair."""
    pixel_values, grids = proc.preprocess_images([source, edited], self.image_cfg)
    ids = self.chat.encode(self.prompt.format(instruction, requirement), grids.tolist())
    return ids, pixel_values, grids

  def score(self, sources: Sequence, edits: Sequence, instructions: Sequence[str],
            requirements: Sequence[str], progress: str | None = None) -> RewardResult:
    """Images are PIL images or uint8 (H, W, 3) arrays (see `processor.read_image` for files).
    `progress`: a progress bar over the scoring calls with this label (none when None)."""
    n = len(sources)
    if not (len(edits) == len(instructions) == len(requirements) == n):
      raise ValueError(f"got {n} sources, {len(edits)} edits, {len(instructions)} instructions and "
                       f"{len(requirements)} requirements; they must pair up")
    pairs = []
    for i, args in enumerate(zip(sources, edits, instructions, requirements)):
      try:
        pairs.append(self.encode_pair(*args))
      except proc.ProcessorError as e:
        raise proc.ProcessorError(f"pair {i} (instruction {args[2]!r}): {e}") from e
    groups: dict[bytes, list[int]] = {}
    for i, (_, _, grids) in enumerate(pairs):
      groups.setdefault(grids.tobytes(), []).append(i)
    scores = np.full(n, np.nan, np.float32)
    probs = np.full((n, len(DIGITS)), np.nan, np.float32)
    valid = np.zeros(n, bool)
    calls = [members[start:start + self.batch_size] for members in groups.values()
             for start in range(0, len(members), self.batch_size)]
    state = jax.device_put(self._state, self._on_device) if self.offload else self._state
    for rows in tqdm(calls, desc=progress, disable=progress is None, leave=False):
      preemption.check("before a judge call")
      s, p, v = self._score_rows(state, [pairs[i] for i in rows])
      scores[rows], probs[rows], valid[rows] = s, p, v
    del state  # offloaded: the device copy goes with it, the host copy stays
    return RewardResult(scores, probs, valid)

  def _score_rows(self, state, pairs):
    """One jitted call on pairs of equal image sizes, padded to a bucketed batch and length."""
    rows = _bucket(len(pairs), self.batch_size, self._row_multiple)
    padded = list(pairs) + [pairs[0]] * (rows - len(pairs))  # repeated rows: computed, then dropped
    longest = max(len(ids) for ids, _, _ in padded)
    input_ids, mask, positions = proc.pad_left([ids for ids, _, _ in padded],
                                               length=-(-longest // self.length_multiple) * self.length_multiple)
    batch = qwen2_5_vl.prepare_batch(input_ids, mask, np.concatenate([pv for _, pv, _ in padded]),
                                     np.concatenate([g for _, _, g in padded]), self.cfg)
    placed = qwen2_5_vl.place_batch(batch, self.mesh, self.rules)
    s, p, v = self._step(state, placed, shd.put_rows(positions[:, None], self.mesh, self.rules))
    k = len(pairs)
    return shd.to_host(s)[:k], shd.to_host(p)[:k], shd.to_host(v)[:k]


def _mesh_axes(rules, name: str) -> tuple[str, ...]:
  target = dict(rules).get(name)
  return () if target is None else (target,) if isinstance(target, str) else tuple(target)


# --------------------------------------------------------------------------------------------------
class MllmReward:
  """An `MllmJudge` as a `Reward`: each record's "prompt" is the instruction, its "requirement" the requirement."""

  def __init__(self, judge: MllmJudge):
    self.judge = judge

  def score(self, sources, edits, records, *, progress: str | None = None) -> RewardResult:
    return self.judge.score(sources, edits, [r["prompt"] for r in records], [r["requirement"] for r in records],
                            progress=progress)


@register("mllm")
def build_mllm(config, mesh=None, rules=None) -> MllmReward:
  """The tiny random judge (`config.reward.tiny`: the demo's, drawn from `config.seed`) or Qwen2.5-VL read from
  `config.reward.model_dir`, placed on `mesh`."""
  rules = shd.DEFAULT_RULES if rules is None else rules
  template_file = config.reward.template_file or None
  if config.reward.tiny:
    judge = MllmJudge.tiny(config.seed, config.reward.batch_size, template_file=template_file, mesh=mesh, rules=rules,
                           offload=config.reward.offload, attention_impl=config.model.attention_impl)
  else:
    judge = MllmJudge(config.reward.model_dir, template_file=template_file, dtype=config.reward.dtype, mesh=mesh,
                      rules=rules, batch_size=config.reward.batch_size, offload=config.reward.offload,
                      attention_impl=config.model.attention_impl)
  return MllmReward(judge)
