"""Batched generation with the KV cache: greedy ids and every step's logits against transformers' `generate`
(two images of different sizes per prompt, left padding, EOS in one row), the 8-device mesh, temperature
sampling, and launch/ask.py end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from helpers import max_rel_err
from PIL import Image
from qwen_fixtures import QWEN_BOUND, random_image, reference_chat_ids

from editr1_jax import generation as gen
from editr1_jax import sharding as shd
from editr1_jax.models import qwen2_5_vl as qv
from editr1_jax.reward import processor as proc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 8  # new tokens
# Two images of different sizes per prompt, texts of different lengths: the batch is left-padded.
PROMPTS = [(((97, 131), (64, 64)), "Replace the cat with a fox."),
           (((60, 90), (300, 41)), "Rate the edit from 0 to 5 and answer with the digit only.")]
# A step's logits go through the prefill's path (the cached keys and values came through it, and the new token
# through the same layers): depth and longest reduction (the patch embedding; attention spans <= L + N < 1176)
# as for a prefill, so QWEN_BOUND holds at every step.
STEP_BOUND = QWEN_BOUND


def prompts():
  return [([random_image(*size, seed=2 * i + j) for j, size in enumerate(sizes)], text)
          for i, (sizes, text) in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def folder(qwen_reference):
  return qwen_reference[1]


@pytest.fixture(scope="module")
def ours(folder):
  return qv.load_qwen2_5_vl(folder)


@pytest.fixture(scope="module")
def chat(folder):
  return proc.ChatFormatter(folder, proc.ImageProcessorConfig.from_folder(folder))


def reference_generate(model, batch: qv.Batch, grids, **kw):
  """transformers' greedy `generate` on the same left-padded ids and pixels, M-RoPE on (mm_token_type_ids)."""
  ids = torch.from_numpy(np.asarray(batch.input_ids, np.int64))
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=torch.from_numpy(np.asarray(batch.attention_mask, np.int64)),
                         mm_token_type_ids=(ids == model.config.image_token_id).int(),
                         pixel_values=torch.from_numpy(np.asarray(batch.pixel_values)),
                         image_grid_thw=torch.from_numpy(grids), max_new_tokens=N, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **kw)
  return out.sequences[:, ids.shape[1]:].numpy(), torch.stack(out.logits, 1).numpy()


@pytest.fixture(scope="module")
def greedy(qwen_reference, ours, chat):
  """(batch, EOS id, our Generation, reference ids, reference logits). The EOS is the token transformers' greedy
  run emits at step 2 of row 0 (and never in row 1), so row 0 stops there and row 1 runs to the end."""
  batch = gen.chat_batch(chat, prompts(), ours.cfg)
  grids = np.concatenate([proc.preprocess_images(images, chat.image_cfg)[1] for images, _ in prompts()])
  free, _ = reference_generate(qwen_reference[0], batch, grids)
  eos = int(free[0, 2])
  assert eos not in free[0, :2] and eos not in free[1], free
  ref_ids, ref_logits = reference_generate(qwen_reference[0], batch, grids, eos_token_id=eos, pad_token_id=eos)
  out = gen.generate(ours, batch, max_new_tokens=N, eos_token_ids=[eos], return_logits=True)
  return batch, eos, out, ref_ids, ref_logits


def test_greedy_equals_transformers(ours, greedy):
  batch, eos, out, ref_ids, ref_logits = greedy
  assert np.asarray(batch.attention_mask)[:, 0].tolist() == [False, True]  # row 0 is left-padded
  np.testing.assert_array_equal(out.token_ids, ref_ids)  # row 0 pads (the EOS id) after its EOS, as transformers
  np.testing.assert_array_equal(out.lengths, [3, N])
  assert out.logits.shape == ref_logits.shape == (2, N, ours.cfg.vocab_size)
  errors = [max_rel_err(out.logits[:, k], ref_logits[:, k]) for k in range(N)]  # measured <= 6.2e-7
  assert max(errors) <= STEP_BOUND, errors



def test_splash_kernel_generates_the_same(folder, chat, greedy):
  """The prefill (causal, left-padded, a static offset) and every cached step (one query over the filled positions,
  a traced offset) through the splash kernel (interpret mode), on the 8-device mesh (the kernel under shard_map):
  transformers' ids, logits within the same bound; bucketed too (vision groups with no valid key among them)."""
  batch, eos, _, ref_ids, ref_logits = greedy
  mesh = shd.make_mesh((2, 2, 2))
  model = qv.load_qwen2_5_vl(folder, attention_impl="splash", mesh=mesh)
  for given in (batch, gen.chat_batch(chat, prompts(), model.cfg, buckets=2)):
    out = gen.generate(model, given, max_new_tokens=N, eos_token_ids=[eos], return_logits=True, mesh=mesh)
    np.testing.assert_array_equal(out.token_ids, ref_ids)
    errors = [max_rel_err(out.logits[:, k], ref_logits[:, k]) for k in range(N)]
    assert max(errors) <= STEP_BOUND, errors

def test_sharded_equals_single_device(folder, chat, greedy):
  """Rows (a, b, b, a) over data x fsdp of a (2, 2, 2) mesh, parameters FSDP/tensor-sharded, under remat: the
  2-row results."""
  _, eos, single, _, _ = greedy
  mesh = shd.make_mesh((2, 2, 2))
  model = qv.load_qwen2_5_vl(folder, mesh=mesh, remat="full")
  a, b = prompts()
  batch = gen.chat_batch(chat, [a, b, b, a], model.cfg)
  out = gen.generate(model, batch, max_new_tokens=N, eos_token_ids=[eos], return_logits=True, mesh=mesh)
  assert out.token_ids.sharding.spec[0] == ("data", "fsdp")
  order = [0, 1, 1, 0]
  np.testing.assert_array_equal(out.token_ids, np.asarray(single.token_ids)[order])
  np.testing.assert_array_equal(out.lengths, np.asarray(single.lengths)[order])
  assert max_rel_err(out.logits, np.asarray(single.logits)[order]) <= STEP_BOUND  # rounding only: 4.4e-7


def test_bucket_rule():
  """per_octave sizes per octave, less than 1 / per_octave wasted."""
  ns = [1, 3, 4, 5, 9, 128, 129, 161, 3000, 4097]
  assert [gen.bucket(n, 4) for n in ns] == [1, 3, 4, 5, 10, 128, 160, 192, 3072, 5120]
  assert [gen.bucket(n, 1) for n in ns] == [1, 4, 4, 8, 16, 128, 256, 256, 4096, 8192]
  assert all(n <= gen.bucket(n, q) < n * (1 + 1 / q) for n in range(1, 5000) for q in (1, 2, 4, 8))
  with pytest.raises(ValueError, match="at least 1"):
    gen.bucket(5, 0)


@pytest.mark.parametrize("per_octave", [1, 2, 4])
def test_bucketed_batch_generates_the_same(ours, chat, greedy, per_octave):
  """Prompts left-padded to their bucket, blank patches appended, windows (partial ones widened) and frames padded
  with groups of their own: the unpadded batch's tokens, its logits up to rounding."""
  batch, eos, out, _, _ = greedy
  padded = gen.chat_batch(chat, prompts(), ours.cfg, buckets=per_octave)
  shapes = lambda b: (b.input_ids.shape[1], len(b.pixel_values), b.vision.windows.index.shape,
                      b.vision.frames.index.shape)
  assert shapes(batch) == (89, 144, (7, 48), (4, 60))  # windows of 12 units at most: widened to the full 16
  # frame groups: 4 real + the blank ones, their count bucketed too (6 -> 8 at 1 per octave, 5 -> 6 at 2)
  assert shapes(padded) == {1: (128, 256, (16, 64), (8, 64)), 2: (96, 192, (8, 64), (6, 64)),
                            4: (96, 160, (8, 64), (5, 64))}[per_octave]
  got = gen.generate(ours, padded, max_new_tokens=N, eos_token_ids=[eos], return_logits=True)
  np.testing.assert_array_equal(got.token_ids, out.token_ids)
  np.testing.assert_array_equal(got.lengths, out.lengths)
  assert max_rel_err(got.logits, out.logits) <= STEP_BOUND


def test_sampling(ours, chat, greedy):
  batch, eos, out_greedy, _, _ = greedy
  keys = jax.random.split(jax.random.key(3), 2)

  def sample(batch, keys, temperature=1.0):
    return np.asarray(gen.generate(ours, batch, max_new_tokens=N, eos_token_ids=[eos], temperature=temperature,
                                   keys=keys).token_ids)

  first = sample(batch, keys)
  np.testing.assert_array_equal(first, sample(batch, keys))  # a fixed key: the same tokens
  assert (first != np.asarray(out_greedy.token_ids)).any() and (first != sample(batch, keys[::-1])).any()
  # A row's tokens follow its own key, wherever it sits in the batch.
  swapped = gen.chat_batch(chat, prompts()[::-1], ours.cfg)
  np.testing.assert_array_equal(sample(swapped, keys[::-1]), first[::-1])
  # temperature -> 0 is greedy: Gumbel noise (-log -log u, u in [tiny, 1) float32: -4.5..16.6) moves z / t by less
  # than 22 between two tokens, so a top-2 gap above 22 t keeps the argmax; the gaps here are that large.
  t = 1e-5
  z = np.sort(np.asarray(out_greedy.logits), axis=-1)
  assert (z[..., -1] - z[..., -2]).min() > 22 * t
  np.testing.assert_array_equal(sample(batch, keys, t), out_greedy.token_ids)


def test_input_errors(ours, greedy):
  batch, eos = greedy[:2]
  run = lambda b=batch, **kw: gen.generate(ours, b, **{"max_new_tokens": N, "eos_token_ids": [eos], **kw})
  with pytest.raises(ValueError, match="left-padded"):
    run(batch.replace(attention_mask=np.asarray(batch.attention_mask)[:, ::-1]))
  with pytest.raises(ValueError, match="max_new_tokens"):
    run(max_new_tokens=0)
  with pytest.raises(ValueError, match="vocab_size"):
    run(eos_token_ids=[ours.cfg.vocab_size])
  with pytest.raises(ValueError, match="one key per row"):
    run(temperature=1.0)
  with pytest.raises(ValueError, match="shape"):
    run(temperature=1.0, keys=jax.random.split(jax.random.key(0), 3))


# --------------------------------------------------------------------------------------------------
def ask(*argv):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "ask.py"), *argv], env=env,
                        capture_output=True, text=True, timeout=300)


def test_ask_prints_the_greedy_answer(qwen_reference, tmp_path):
  """launch/ask.py against transformers end to end: its tokenizer, chat template, image processor and generation
  config (EOS), greedy."""
  from transformers import AutoTokenizer
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  model, folder = qwen_reference
  images, text = prompts()[1]
  paths = [str(tmp_path / f"{i}.png") for i in range(len(images))]
  for image, path in zip(images, paths):
    image.save(path)
  out = ask(f"--model={folder}", *[f"--image={p}" for p in paths], f"--prompt={text}", f"--max_new_tokens={N}",
            "--json")
  assert out.returncode == 0, out.stderr
  printed = json.loads(out.stdout)  # exactly one JSON object, nothing else on stdout
  tokenizer = AutoTokenizer.from_pretrained(folder)
  pixels = Qwen2VLImageProcessorPil.from_pretrained(folder)([Image.open(p) for p in paths])
  ids = torch.tensor([reference_chat_ids(tokenizer, text, pixels["image_grid_thw"].tolist())])
  with torch.no_grad():
    expected = model.generate(input_ids=ids, mm_token_type_ids=(ids == model.config.image_token_id).int(),
                              pixel_values=torch.from_numpy(pixels["pixel_values"]),
                              image_grid_thw=torch.from_numpy(pixels["image_grid_thw"]), max_new_tokens=N,
                              do_sample=False)[0, ids.shape[1]:].tolist()
  assert printed == {"token_ids": expected, "text": tokenizer.decode(expected, skip_special_tokens=True)}


@pytest.mark.parametrize("replace, error", [
    ({"--max_new_tokens": "0"}, "error: --max_new_tokens must be at least 1, got 0"),
    ({"--prompt": "  "}, "error: --prompt is empty"),
    ({"--image": "{tmp}/none.png"}, "error: --image: {tmp}/none.png: image not found"),
    ({"--model": "{tmp}/none"}, "error: --model: {tmp}/none is not a folder"),
])
def test_ask_refuses_bad_flags_before_loading(tmp_path, replace, error):
  """An empty model folder: a check that came after loading would fail on the folder, not on the flag."""
  (tmp_path / "model").mkdir()
  Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
  flags = {"--model": f"{tmp_path / 'model'}", "--image": f"{tmp_path / 'ok.png'}", "--prompt": "what is it?"}
  flags.update({k: v.format(tmp=tmp_path) for k, v in replace.items()})
  out = ask(*[f"{k}={v}" for k, v in flags.items()])
  lines = out.stderr.strip().splitlines()
  assert out.returncode != 0 and out.stdout == "" and len(lines) == 1, out.stderr
  assert lines[0] == error.format(tmp=tmp_path), lines


def test_runtime_imports_no_torch():
  code = ("import sys, runpy; import editr1_jax.generation; runpy.run_path(sys.argv[1], run_name='not_main'); "
          "bad = [m for m in ('torch', 'diffusers', 'peft') if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "launch", "ask.py")], check=True, cwd=ROOT,
                 timeout=120)
