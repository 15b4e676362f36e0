"""Tiny text-encoder folders for the tests, in FLUX's pipeline layout.

tokenizer/ and tokenizer_2/: CLIP's and T5's layouts trained in code on CORPUS by `editr1_jax.tiny`.
text_encoder/, text_encoder_2/: random perturbed transformers models saved with `save_pretrained`.
Import the `text_pipeline` fixture into a test module for one shared folder per module.
`clip_reference` / `t5_reference` (and their loads `clip_ours` / `t5_ours`): one encoder folder each, without
tokenizer, shared by test_clip.py, test_t5.py and test_models_contract.py.
"""

import os

import pytest
import torch
from helpers import float32_bound, perturb_

from editr1_jax import tiny
from editr1_jax.models import clip, t5
from editr1_jax.tiny import CLIP_MAX_LENGTH

CORPUS = [
    "make the sky a deep orange sunset", "replace the red car with a blue bicycle",
    "add a small cat sitting on the wooden table", "turn the photo into a pencil sketch",
    "remove the people from the background", "change the season to winter with snow on the trees",
    "give the man a black hat and sunglasses", "make it look like an oil painting from the 1800s",
    "the dog should be running across the green field", "brighten the room and add warm lights",
]
# Sizes: the model vocabularies cover the tokenizers (T5's, like the real one, is a little larger).
CLIP_TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5)
T5_TINY = dict(d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=20, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
# float32 rounding of their forwards (helpers.float32_bound); a layer is norm, qkv, QK, softmax, AV, out, norm, MLP in,
# MLP out (a LayerNorm counts 2). CLIP: attention over 77 tokens the longest, 2 x 11 + final LayerNorm 2 = 24: 1.0e-5.
CLIP_BOUND = float32_bound(CLIP_MAX_LENGTH, depth=24)
# T5: d_ff 48 the longest (the tests' sequences are <= 45), 3 x 9 + final RMSNorm = 28: 8.7e-6.
T5_BOUND = float32_bound(T5_TINY["d_ff"], depth=28)


def write_clip_tokenizer(folder: str):
  return tiny.write_clip_tokenizer(folder, CORPUS)


def write_t5_tokenizer(folder: str):
  return tiny.write_t5_tokenizer(folder, CORPUS)


def write_clip_model(folder: str, vocab_size: int, eos_token_id: int, seed: int = 0):
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(seed)
  config = CLIPTextConfig(vocab_size=vocab_size, eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=1,
                          **CLIP_TINY)
  model = CLIPTextModel(config).eval()
  perturb_(model, seed=seed)
  model.save_pretrained(folder)
  return model


def write_t5_model(folder: str, vocab_size: int, seed: int = 1):
  from transformers import T5Config, T5EncoderModel
  torch.manual_seed(seed)
  model = T5EncoderModel(T5Config(vocab_size=vocab_size, **T5_TINY)).eval()  # eval: no dropout
  perturb_(model, seed=seed)
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory):
  """(pipeline folder, {tokenizer, tokenizer_2, text_encoder, text_encoder_2}) with FLUX's legacy CLIP config."""
  root = str(tmp_path_factory.mktemp("text_pipeline"))
  parts = {"tokenizer": write_clip_tokenizer(os.path.join(root, "tokenizer")),
           "tokenizer_2": write_t5_tokenizer(os.path.join(root, "tokenizer_2"))}
  # FLUX's text_encoder/config.json says eos_token_id 2 (transformers' legacy argmax pooling).
  parts["text_encoder"] = write_clip_model(os.path.join(root, "text_encoder"), len(parts["tokenizer"]), 2)
  parts["text_encoder_2"] = write_t5_model(os.path.join(root, "text_encoder_2"), len(parts["tokenizer_2"]) + 5)
  return root, parts


# --------------------------------------------------------------------------------------------------
# One encoder each, without tokenizer (the tests make their ids); CLIP's special tokens have the highest ids.
CLIP_VOCAB = 100
T5_VOCAB = 90


@pytest.fixture(scope="session")
def clip_reference(tmp_path_factory):
  """FLUX's config: eos_token_id 2, so transformers pools at the highest id."""
  folder = str(tmp_path_factory.mktemp("clip") / "text_encoder")
  return write_clip_model(folder, CLIP_VOCAB, eos_token_id=2), folder


@pytest.fixture(scope="session")
def clip_ours(clip_reference):
  return clip.load_clip_text(clip_reference[1])


@pytest.fixture(scope="session")
def t5_reference(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("t5") / "text_encoder_2")
  return write_t5_model(folder, T5_VOCAB), folder


@pytest.fixture(scope="session")
def t5_ours(t5_reference):
  return t5.load_t5_encoder(t5_reference[1])
