"""CLIP text encoder: pooling rules, bf16, name schemes, config errors (loader errors, full size and parity with
transformers: test_models_contract.py)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from flax import nnx
from helpers import bfloat16_bound, max_rel_err
from text_fixtures import CLIP_BOUND, CLIP_MAX_LENGTH, write_clip_model
from text_fixtures import CLIP_VOCAB as VOCAB

from editr1_jax import weights as wio
from editr1_jax.models import clip

BOS, EOS = VOCAB - 2, VOCAB - 1  # CLIP's layout: the special tokens have the highest ids


def make_ids(eos_positions, eos=EOS, pad=EOS, seed=0):
  """[bos, words..., eos, pad...] rows of CLIP's length, end-of-text at the given positions."""
  rng = np.random.default_rng(seed)
  ids = np.full((len(eos_positions), CLIP_MAX_LENGTH), pad, np.int64)
  for row, pos in enumerate(eos_positions):
    ids[row, 0] = BOS
    ids[row, 1:pos] = rng.integers(2, 80, pos - 1)  # word ids below every special id
    ids[row, pos] = eos
  return ids


def torch_forward(model, ids):
  with torch.no_grad():
    out = model(torch.from_numpy(ids))
  return out.last_hidden_state.float().numpy(), out.pooler_output.float().numpy()


@pytest.fixture(scope="module")
def legacy(clip_reference):
  """FLUX's config: eos_token_id 2, so transformers pools at the highest id (text_fixtures, shared with
  test_models_contract.py)."""
  return clip_reference


@pytest.fixture(scope="module")
def modern(tmp_path_factory):
  """A config with the real end-of-text id (transformers >= 4.31): pools at its first occurrence."""
  folder = str(tmp_path_factory.mktemp("clip_modern"))
  return write_clip_model(folder, VOCAB, eos_token_id=EOS - 10, seed=3), folder


def test_modern_eos_id_pools_first_occurrence(modern):
  eos = EOS - 10
  ids = make_ids([4, 30], eos=eos, pad=0)
  ids[0, 10] = eos  # a second end-of-text later on: the first one counts
  ids[1, 40] = EOS  # a higher id after it: the legacy argmax rule would pick this one
  ref_hidden, ref_pooled = torch_forward(modern[0], ids)
  model = clip.load_clip_text(modern[1])
  assert model.cfg.eos_token_id == eos
  hidden, pooled = model(ids)
  assert max_rel_err(hidden, ref_hidden) <= CLIP_BOUND  # float32 rounding only
  assert max_rel_err(pooled, ref_pooled) <= CLIP_BOUND
  np.testing.assert_array_equal(np.asarray(clip.pooled_positions(ids, eos)), [4, 30])


def test_legacy_pooling_is_argmax_of_ids():
  ids = np.array([[5, 9, 3, 9], [1, 2, 7, 0]])
  np.testing.assert_array_equal(np.asarray(clip.pooled_positions(ids, clip.LEGACY_EOS_TOKEN_ID)), [1, 2])


def test_jit_and_bfloat16(legacy):
  """bf16 rounding, not a bug, separates ours from float32: by as much as transformers' own bf16 run."""
  from transformers import CLIPTextModel
  ids = make_ids([6, 40, 76])
  _, exact = torch_forward(legacy[0], ids)
  _, theirs = torch_forward(CLIPTextModel.from_pretrained(legacy[1], dtype=torch.bfloat16).eval(), ids)
  model = clip.load_clip_text(legacy[1], dtype="bfloat16")
  hidden, pooled = nnx.jit(lambda m, x: m(x))(model, ids)
  assert hidden.dtype == pooled.dtype == np.dtype("bfloat16")
  # measured: transformers bf16 9.2e-3, ours 9.2e-3 from float32; 24 layers deep (see bfloat16_bound)
  assert max_rel_err(pooled, exact) <= max(2 * max_rel_err(theirs, exact), bfloat16_bound(24))


def test_transformers4_prefix_and_pipeline_layout(legacy, tmp_path):
  """FLUX's checkpoint (saved by transformers 4) names tensors `text_model.*`; a pipeline folder holds text_encoder/."""
  reader = wio.SafetensorsReader.from_folder(legacy[1])
  folder = tmp_path / "text_encoder"
  folder.mkdir()
  shutil.copy(os.path.join(legacy[1], "config.json"), folder)
  wio.save_safetensors({f"text_model.{n}": reader.read(n) for n in reader.names()}, str(folder / "model.safetensors"))
  ids = make_ids([8, 20])
  expected = clip.load_clip_text(legacy[1])(ids)
  got = clip.load_clip_text(str(tmp_path))(ids)
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------------
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)


def test_config_errors():
  with pytest.raises(ValueError, match="hidden_act 'gelu'"):
    clip.CLIPTextConfig.from_transformers_config(dict(CLIP_L, hidden_act="gelu"), source="x/config.json")
  with pytest.raises(ValueError, match=r"x/config.json: missing \['layer_norm_eps'\]"):
    clip.CLIPTextConfig.from_transformers_config({k: v for k, v in CLIP_L.items() if k != "layer_norm_eps"},
                                                 source="x/config.json")
  with pytest.raises(ValueError, match="eos_token_id must be one integer"):
    clip.CLIPTextConfig.from_transformers_config(dict(CLIP_L, eos_token_id=[2, 3]))
  model = clip.CLIPTextModel(clip.tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="17 tokens; the model has 16 positions"):
    model(np.zeros((1, 17), np.int32))


def test_missing_config(tmp_path):
  with pytest.raises(wio.CheckpointError, match="config.json: config file not found"):
    clip.load_clip_text(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(dict(CLIP_L, hidden_act="relu")))
  with pytest.raises(ValueError, match="config.json: hidden_act 'relu'"):
    clip.load_clip_text(str(tmp_path))
