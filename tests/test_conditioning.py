"""Conditioning path vs diffusers' FluxKontextPipeline.encode_prompt on a tiny pipeline (no transformer/VAE)."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import max_rel_err
from text_fixtures import CLIP_BOUND, CORPUS, T5_BOUND

from editr1_jax import conditioning
from editr1_jax import sharding as shd

T5_LENGTH = 24  # short, so truncation and padding both happen
LONG = " ".join(CORPUS)  # over 77 CLIP and 24 T5 tokens
PROMPTS = ["make the sky a deep orange sunset", "add a cat", LONG, "Turn the PHOTO into a pencil sketch, please!"]
PROMPTS_2 = ["remove the people", "the dog should be running", "brighten the room", LONG]


@pytest.fixture(scope="module")
def pipeline(text_pipeline):  # noqa: F811
  """diffusers' pipeline around the reference encoders, recording the ids it feeds them."""
  from diffusers import FluxKontextPipeline
  _, parts = text_pipeline
  pipe = FluxKontextPipeline(scheduler=None, vae=None, transformer=None, **parts)
  fed = {}
  for name in ("text_encoder", "text_encoder_2"):
    parts[name].register_forward_pre_hook(
        lambda module, args, kwargs, name=name: fed.__setitem__(name, (args[0] if args else kwargs["input_ids"])
                                                                .numpy().copy()), with_kwargs=True)
  return pipe, fed


def reference(pipeline, prompts, prompts_2=None, max_sequence_length=T5_LENGTH):
  pipe, fed = pipeline
  with torch.no_grad():
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=prompts_2, max_sequence_length=max_sequence_length)
  return dict(embeds=embeds.numpy(), pooled=pooled.numpy(), text_ids=text_ids.numpy(), clip_ids=fed["text_encoder"],
              t5_ids=fed["text_encoder_2"])


@pytest.fixture(scope="module")
def encoders(text_pipeline):  # noqa: F811
  return conditioning.TextEncoders.from_pipeline(text_pipeline[0], max_sequence_length=T5_LENGTH)


@pytest.mark.parametrize("prompts_2", [None, PROMPTS_2], ids=["same_prompt", "prompt_2"])
def test_tokenisation_equals_pipeline(pipeline, encoders, prompts_2):
  ref = reference(pipeline, PROMPTS, prompts_2)
  clip_ids, t5_ids = encoders.tokenize(PROMPTS, prompts_2)
  assert clip_ids.shape == (4, 77) and t5_ids.shape == (4, T5_LENGTH)
  np.testing.assert_array_equal(clip_ids, ref["clip_ids"])
  np.testing.assert_array_equal(t5_ids, ref["t5_ids"])
  # the batch covers: end-of-text at different places, CLIP padding, T5 padding and truncation
  eos_positions = np.argmax(clip_ids, axis=1)
  assert len(set(eos_positions.tolist())) == 4 and eos_positions[2] == 76
  assert (t5_ids == 0).any() and (t5_ids != 0).all(axis=1).any()


def test_encode_prompts_equals_pipeline(pipeline, encoders):
  ref = reference(pipeline, PROMPTS)
  embeds, pooled, txt_ids = encoders(PROMPTS)
  assert embeds.shape == ref["embeds"].shape and pooled.shape == ref["pooled"].shape
  assert max_rel_err(embeds, ref["embeds"]) <= T5_BOUND  # embeds are T5's, pooled CLIP's: float32 rounding only
  assert max_rel_err(pooled, ref["pooled"]) <= CLIP_BOUND
  np.testing.assert_array_equal(np.asarray(txt_ids), ref["text_ids"])


def test_single_string_prompt(pipeline, encoders):
  ref = reference(pipeline, "add a cat")
  embeds, pooled, _ = encoders("add a cat")
  assert max_rel_err(embeds, ref["embeds"]) <= T5_BOUND and max_rel_err(pooled, ref["pooled"]) <= CLIP_BOUND


def test_sharded_encode_equals_single_device(text_pipeline, encoders):  # noqa: F811
  mesh = shd.make_mesh((2, 2, 2))
  sharded = conditioning.TextEncoders.from_pipeline(text_pipeline[0], max_sequence_length=T5_LENGTH, mesh=mesh)
  wi = sharded.t5.encoder.block.stacked.layer[1].DenseReluDense.wi_0.kernel[...]  # the blocks stacked for a scan
  assert wi.sharding.spec == shd.logical_to_spec(("layers", "embed", "mlp"), shape=wi.shape, mesh=mesh)
  assert len(wi.sharding.device_set) == 8
  got = sharded(PROMPTS)
  for a, b, bound in zip(got, encoders(PROMPTS), (T5_BOUND, CLIP_BOUND, 0.0)):  # embeds, pooled, exact txt_ids
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=bound * np.abs(np.asarray(b)).max())


def test_transformers4_clip_tokenizer_files(text_pipeline, encoders, tmp_path):  # noqa: F811
  """FLUX's tokenizer/ holds vocab.json + merges.txt (no tokenizer.json): same ids."""
  root, _ = text_pipeline
  with open(os.path.join(root, "tokenizer", "tokenizer.json")) as f:
    model = json.load(f)["model"]
  (tmp_path / "tokenizer").mkdir()
  (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(model["vocab"]))
  (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in
                                                                                  model["merges"]))
  shutil.copy(os.path.join(root, "tokenizer", "tokenizer_config.json"), tmp_path / "tokenizer")
  shutil.copytree(os.path.join(root, "tokenizer_2"), tmp_path / "tokenizer_2")
  clip_tokenizer, _ = conditioning.load_tokenizers(str(tmp_path))
  np.testing.assert_array_equal(conditioning.tokenize_clip(clip_tokenizer, PROMPTS), encoders.tokenize(PROMPTS)[0])


def test_truncation_warns(encoders, caplog):
  with caplog.at_level(logging.WARNING, logger="editr1_jax.conditioning"):
    encoders.tokenize(["add a cat", LONG])
  start = LONG[:40]  # the instruction's start names it (a batch position means nothing to a user)
  assert f'CLIP: 1 prompt(s) truncated to 77 tokens: "{start}' in caplog.text
  assert f'T5: 1 prompt(s) truncated to {T5_LENGTH} tokens: "{start}' in caplog.text
  assert "add a cat" not in caplog.text


def test_errors(encoders, tmp_path):
  with pytest.raises(ValueError, match="max_sequence_length must be in \\[1, 512\\], got 513"):
    conditioning.tokenize_t5(encoders.t5_tokenizer, PROMPTS, 513)
  with pytest.raises(ValueError, match="CLIP: no prompts given"):
    encoders.tokenize([])
  with pytest.raises(TypeError, match="T5: prompts at positions \\[1\\] are not strings"):
    encoders.tokenize(["a", "b"], ["a", None])
  with pytest.raises(ValueError, match="2 CLIP prompts but 1 T5 prompts"):
    encoders(["a", "b"], ["a"])
  with pytest.raises(FileNotFoundError, match="tokenizer: tokenizer folder not found"):
    conditioning.load_tokenizers(str(tmp_path))


def test_runtime_does_not_import_torch(text_pipeline):  # noqa: F811
  code = ("import sys\nfrom editr1_jax.conditioning import TextEncoders\n"
          f"out = TextEncoders.from_pipeline({text_pipeline[0]!r}, max_sequence_length=8)(['add a cat'])\n"
          "assert out[0].shape == (1, 8, 32), out[0].shape\n"
          "bad = sorted(m for m in ('torch', 'diffusers', 'peft') if m in sys.modules)\n"
          "assert not bad, bad\n")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
             JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
