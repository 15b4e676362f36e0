"""Tiny text-encoder folders for the tests, in FLUX's pipeline layout.

tokenizer/: a byte-level BPE trained in code with CLIP's normaliser, pre-tokeniser and `</w>` word
suffix, its special tokens last (so the end-of-text token has the highest id, as in CLIP's vocab),
saved with `CLIPTokenizer.save_pretrained`. tokenizer_2/: a Unigram model trained in code with T5's
`<pad>` `</s>` `<unk>` first and a few sentinels, saved with `T5Tokenizer.save_pretrained`.
text_encoder/, text_encoder_2/: random perturbed transformers models saved with `save_pretrained`.
Import the `text_pipeline` fixture into a test module for one shared folder per module.
"""

import json
import os

import pytest
import torch
from helpers import perturb_

CORPUS = [
    "make the sky a deep orange sunset", "replace the red car with a blue bicycle",
    "add a small cat sitting on the wooden table", "turn the photo into a pencil sketch",
    "remove the people from the background", "change the season to winter with snow on the trees",
    "give the man a black hat and sunglasses", "make it look like an oil painting from the 1800s",
    "the dog should be running across the green field", "brighten the room and add warm lights",
]
CLIP_MAX_LENGTH = 77
CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
T5_SPECIAL = ("<pad>", "</s>", "<unk>")
T5_EXTRA_IDS = 3

# Sizes: the model vocabularies cover the tokenizers (T5's, like the real one, is a little larger).
CLIP_TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5)
T5_TINY = dict(d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=20, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)


def write_clip_tokenizer(folder: str):
  from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
  from transformers import CLIPTokenizer
  bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
  bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                         normalizers.Lowercase()])
  bpe.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                           behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet,
                                                      end_of_word_suffix="</w>", show_progress=False))
  merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
  # CLIP's layout: every byte, every byte ending a word, the merges, then the special tokens.
  tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + list(CLIP_SPECIAL)
  vocab = {}
  for t in tokens:
    vocab.setdefault(t, len(vocab))
  tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
  tok.save_pretrained(folder)
  return tok


def write_t5_tokenizer(folder: str):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers import T5Tokenizer
  unigram = Tokenizer(models.Unigram())
  unigram.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
  unigram.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=120, special_tokens=list(T5_SPECIAL),
                                                              unk_token="<unk>", show_progress=False))
  vocab = [tuple(v) for v in json.loads(unigram.to_str())["model"]["vocab"]]
  assert [v[0] for v in vocab[:3]] == list(T5_SPECIAL), vocab[:3]  # T5Tokenizer wants pad 0, eos 1, unk 2
  tok = T5Tokenizer(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=512)
  tok.save_pretrained(folder)
  return tok


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
