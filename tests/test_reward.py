"""The MLLM logit reward: parity with the same formula on transformers' Qwen2.5-VL logits, the CLI,
sharded scoring, masking of non-finite logits, and judging-prompt template errors."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import max_rel_err
from PIL import Image
from qwen_fixtures import QWEN_BOUND, random_image, reference_chat_ids

from editr1_jax import sharding as shd
from editr1_jax.reward import mllm, processor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scores and probabilities are a softmax of the digit logits z: both move by at most 2 max |dz| relative, and the
# logits' absolute error is QWEN_BOUND x max |z| (2.1 here; sequences of <= 480 tokens stay under K = 1176).
REWARD_BOUND = 2 * 2.1 * QWEN_BOUND  # 2.4e-4
# Pairs 0 and 2 share their image sizes (one batch, left-padded: different instruction lengths); pair 1
# has other sizes (its own call). All sizes resize under the fixture's pixel bounds.
PAIRS = [((97, 131), (64, 64), "Replace the cat with a fox.", "Keep the background unchanged."),
         ((300, 41), (60, 90), "Make the sky red", ""),
         ((97, 131), (64, 64), "Remove the car", "Only the car may change; the street stays as it is.")]


def make_pairs():
  sources = [random_image(*p[0], seed=2 * i) for i, p in enumerate(PAIRS)]
  edits = [random_image(*p[1], seed=2 * i + 1) for i, p in enumerate(PAIRS)]
  return sources, edits, [p[2] for p in PAIRS], [p[3] for p in PAIRS]


def reference_scores(model, folder, sources, edits, instructions, requirements, template_file=None):
  """transformers end to end, one pair at a time, no padding: processor, chat template, logits at the
  last prompt position; then sum_k k softmax(z_digits)_k / 5 in float64."""
  from transformers import AutoTokenizer
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  tokenizer = AutoTokenizer.from_pretrained(folder)
  image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
  prompt = mllm.JudgePrompt.from_file(template_file)
  digits = [tokenizer.convert_tokens_to_ids(d) for d in mllm.DIGITS]
  scores, probs = [], []
  for src, edit, instruction, requirement in zip(sources, edits, instructions, requirements):
    images = image_processor([src, edit])
    ids = reference_chat_ids(tokenizer, prompt.format(instruction, requirement), images["image_grid_thw"].tolist())
    ids = torch.tensor([ids])
    with torch.no_grad():  # mm_token_type_ids as Qwen2_5_VLProcessor returns them: without, no M-RoPE
      logits = model(input_ids=ids, mm_token_type_ids=(ids == model.config.image_token_id).int(),
                     pixel_values=torch.from_numpy(images["pixel_values"]),
                     image_grid_thw=torch.from_numpy(images["image_grid_thw"])).logits
    z = logits[0, -1, digits].double().numpy()
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    scores.append((p * np.arange(6)).sum() / 5)
    probs.append(p)
  return np.asarray(scores), np.asarray(probs)


@pytest.fixture(scope="module")
def judge(qwen_reference):
  return mllm.MllmJudge(qwen_reference[1], batch_size=4, length_multiple=16)


@pytest.fixture(scope="module")
def expected(qwen_reference):
  return reference_scores(*qwen_reference, *make_pairs())


def test_score_equals_transformers(judge, expected):
  result = judge.score(*make_pairs())
  assert result.valid.all() and result.num_invalid == 0
  assert max_rel_err(result.scores, expected[0]) <= REWARD_BOUND
  assert max_rel_err(result.probs, expected[1]) <= REWARD_BOUND
  np.testing.assert_allclose(result.probs.sum(-1), 1.0, atol=1e-6)
  assert np.ptp(expected[0]) > 1e-4  # the pairs really score differently


def test_sharded_scoring_equals_unsharded(qwen_reference, judge):
  mesh = shd.make_mesh((2, 2, 2))
  sharded = mllm.MllmJudge(qwen_reference[1], mesh=mesh, batch_size=4, length_multiple=16)
  pairs = make_pairs()
  assert max_rel_err(sharded.score(*pairs).scores, judge.score(*pairs).scores) <= REWARD_BOUND  # rounding only


def test_offloaded_judge_waits_in_host_memory_and_scores_the_same(qwen_reference, judge):
  """`offload`: the weights sit in pinned host memory between calls (same shardings) and score exactly as the
  resident judge does (the same program on the same values)."""
  mesh = shd.make_mesh((2, 2, 2))
  resident = mllm.MllmJudge(qwen_reference[1], mesh=mesh, batch_size=4, length_multiple=16)
  offloaded = mllm.MllmJudge(qwen_reference[1], mesh=mesh, batch_size=4, length_multiple=16, offload=True)
  assert offloaded.memory_kinds == {"pinned_host"} and "pinned_host" not in resident.memory_kinds
  pairs = make_pairs()
  np.testing.assert_array_equal(offloaded.score(*pairs).scores, resident.score(*pairs).scores)
  assert offloaded.memory_kinds == {"pinned_host"}


def test_cli_json_prints_the_score(qwen_reference, expected, tmp_path):
  sources, edits, instructions, requirements = make_pairs()
  sources[0].save(tmp_path / "source.png")
  edits[0].save(tmp_path / "edited.png")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "score.py"), f"--model={qwen_reference[1]}",
       f"--source={tmp_path / 'source.png'}", f"--edited={tmp_path / 'edited.png'}",
       f"--instruction={instructions[0]}", f"--requirement={requirements[0]}", "--json"],
      env=env, capture_output=True, text=True, timeout=300, check=True)
  printed = json.loads(out.stdout)  # exactly one JSON object, nothing else on stdout
  assert set(printed) == {"score", "probs"} and len(printed["probs"]) == 6
  assert abs(printed["score"] - expected[0][0]) <= REWARD_BOUND * abs(expected[0][0])  # JSON keeps every digit
  assert max_rel_err(printed["probs"], expected[1][0]) <= REWARD_BOUND


def test_cli_names_a_missing_image(qwen_reference, tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "score.py"), f"--model={qwen_reference[1]}",
       f"--source={tmp_path / 'none.png'}", f"--edited={tmp_path / 'none.png'}", "--instruction=x", "--json"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and out.stdout == ""
  assert f"{tmp_path / 'none.png'}: image not found" in out.stderr


def test_runtime_imports_no_torch():
  code = ("import sys, runpy; import editr1_jax.reward.mllm, editr1_jax.reward.processor; "
          "runpy.run_path(sys.argv[1], run_name='not_main'); "
          "bad = [m for m in ('torch', 'diffusers', 'peft') if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "launch", "score.py")], check=True, cwd=ROOT,
                 env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)


# --------------------------------------------------------------------------------------------------
class NonFiniteRow(nnx.Module):
  """The judged model with one row's logits replaced: NaN everywhere or +inf on one digit."""

  def __init__(self, inner, row: int, token: int | None):
    self.inner, self.cfg, self.row, self.token = inner, inner.cfg, row, token

  def logits_at_batch(self, batch, positions):
    logits = self.inner.logits_at_batch(batch, positions)
    if self.token is None:
      return logits.at[self.row].set(jnp.nan)
    return logits.at[self.row, :, self.token].set(jnp.inf)


@pytest.mark.parametrize("digit", [None, 3], ids=["nan_row", "inf_digit"])
def test_non_finite_logits_are_masked_not_zero(qwen_reference, judge, digit):
  inner = nnx.merge(judge._graphdef, judge._state)
  token = None if digit is None else int(judge.digit_ids[digit])
  broken = mllm.MllmJudge(qwen_reference[1], batch_size=4, length_multiple=16,
                          model=NonFiniteRow(inner, row=1, token=token))
  pairs = make_pairs()
  result, clean = broken.score(*pairs), judge.score(*pairs)
  # pairs 0 and 2 form one batch (rows 0, 1): pair 2 is the broken row; pair 1 runs alone (row 0)
  np.testing.assert_array_equal(result.valid, [True, True, False])
  assert result.num_invalid == 1
  assert np.isnan(result.scores[2]) and np.isnan(result.probs[2]).all()
  np.testing.assert_array_equal(result.scores[:2], clean.scores[:2])


def test_digit_scores_formula():
  z = jnp.asarray([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [1.0, -jnp.inf, 0.0, 0.0, 0.0, 0.0],
                   [0.0, 0.0, 0.0, 0.0, 0.0, jnp.nan]])
  score, probs, valid = (np.asarray(a) for a in mllm.digit_scores(z))
  p = np.exp(np.arange(6.0)) / np.exp(np.arange(6.0)).sum()
  np.testing.assert_allclose(probs[0], p, rtol=1e-6)
  np.testing.assert_allclose(score[0], (p * np.arange(6)).sum() / 5, rtol=1e-6)
  np.testing.assert_array_equal(valid, [True, False, False])
  assert np.isnan(score[1:]).all() and np.isnan(probs[1:]).all()


# --------------------------------------------------------------------------------------------------
def test_default_prompt_and_override(judge, qwen_reference, tmp_path):
  prompt = mllm.JudgePrompt.from_file()
  text = prompt.format("Make the sky red", "Keep the trees")
  assert "Make the sky red" in text and "Keep the trees" in text and "{" not in text
  path = tmp_path / "short.txt"
  path.write_text("Edit: {instruction} ({requirement}). Score 0-5?\n")
  custom = mllm.MllmJudge(qwen_reference[1], template_file=str(path), batch_size=4, length_multiple=16,
                          model=nnx.merge(judge._graphdef, judge._state))
  assert custom.prompt.format("a", "b") == "Edit: a (b). Score 0-5?"
  sources, edits, instructions, requirements = make_pairs()
  ours = custom.score(sources[:1], edits[:1], instructions[:1], requirements[:1]).scores
  ref = reference_scores(*qwen_reference, sources[:1], edits[:1], instructions[:1], requirements[:1],
                         template_file=str(path))[0]
  assert max_rel_err(ours, ref) <= REWARD_BOUND


@pytest.mark.parametrize("text,needle", [
    ("Rate {instruction}.", "missing placeholder(s) ['{requirement}']"),
    ("{instruction} {requirement} {score}", "unknown placeholder(s) ['score']"),
    ("{instruction} {requirement} {}", "unknown placeholder(s) ['']"),
    ("{instruction} {requirement} {", "malformed placeholder"),
    ("{instruction!r} {requirement}", "no format spec or conversion"),
])
def test_template_errors_name_the_file(tmp_path, text, needle):
  path = tmp_path / "prompt.txt"
  path.write_text(text)
  with pytest.raises(mllm.TemplateError) as e:
    mllm.JudgePrompt.from_file(str(path))
  assert str(path) in str(e.value) and needle in str(e.value)


def test_missing_template_file(tmp_path):
  with pytest.raises(mllm.TemplateError, match=f"{tmp_path / 'nope.txt'}: cannot read"):
    mllm.JudgePrompt.from_file(str(tmp_path / "nope.txt"))


def test_mismatched_folder_is_an_error(qwen_reference, tmp_path):
  folder = tmp_path / "model"
  shutil.copytree(qwen_reference[1], folder)
  config = json.loads((folder / "config.json").read_text())
  config["image_token_id"] = config["video_token_id"]
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="image_token_id"):
    mllm.MllmJudge(str(folder))


def test_pairs_must_line_up_and_bad_pairs_are_named(judge):
  sources, edits, instructions, requirements = make_pairs()
  with pytest.raises(ValueError, match="must pair up"):
    judge.score(sources, edits[:2], instructions, requirements)
  edits[1] = random_image(2, 500)  # aspect ratio above 200
  with pytest.raises(ValueError, match="pair 1 \\(instruction 'Make the sky red'\\): image of 2x500"):
    judge.score(sources, edits, instructions, requirements)


def test_batch_buckets_are_few_and_split_evenly():
  assert [mllm._bucket(n, 8, 1) for n in (1, 2, 3, 5, 8, 20)] == [1, 2, 4, 8, 8, 8]
  assert mllm._bucket(5, 6, 1) == 6  # never above batch_size
  assert mllm._bucket(1, 8, 4) == 4  # a multiple of the data-parallel width


# --------------------------------------------------------------------------------------------------
def test_read_image_decodes_16_bit_as_8_bit(tmp_path):
  """A 16-bit PNG of 32768 is mid-grey (128), not the white PIL's own conversion makes of it."""
  Image.fromarray(np.full((8, 12), 32768, np.uint16)).save(tmp_path / "grey16.png")
  image = processor.read_image(str(tmp_path / "grey16.png"))
  assert image.mode == "RGB" and image.size == (12, 8)
  np.testing.assert_array_equal(np.asarray(image), 128)


@pytest.mark.parametrize("replace,error", [
    ({"--model": "{tmp}/no_model"}, "error: --model: {tmp}/no_model is not a folder"),
    ({"--instruction": " "}, "error: --instruction is empty"),
    ({"--template_file": "{tmp}/none.txt"}, "error: --template_file: {tmp}/none.txt not found"),
    ({"--source": "{tmp}/garbage.png"}, "error: --source: {tmp}/garbage.png: unreadable image"),
    ({"--edited": "{tmp}/none.png"}, "error: --edited: {tmp}/none.png: image not found"),
])
def test_cli_refuses_bad_arguments_before_loading(tmp_path, replace, error):
  """An empty model folder: a check that came after loading would fail on the folder, not on the flag."""
  (tmp_path / "model").mkdir()
  (tmp_path / "garbage.png").write_bytes(b"not an image")
  Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
  flags = {"--model": f"{tmp_path / 'model'}", "--source": f"{tmp_path / 'ok.png'}",
           "--edited": f"{tmp_path / 'ok.png'}", "--instruction": "make it red"}
  flags.update({k: v.format(tmp=tmp_path) for k, v in replace.items()})
  argv = [f"{k}={v}" for k, v in flags.items()]
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "score.py"), *argv],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120)
  lines = out.stderr.strip().splitlines()
  assert out.returncode != 0 and out.stdout == "" and len(lines) == 1, out.stderr
  assert lines[0].startswith(error.format(tmp=tmp_path)), lines
