"""Tiny Qwen2.5-VL folders for the tests: a byte-level BPE tokenizer trained in code with the Qwen2
pre-tokenizer and special tokens, the Qwen2.5-VL chat template, a random perturbed
`Qwen2_5_VLForConditionalGeneration` saved with `save_pretrained`, and a `preprocessor_config.json`.

Use `write_tokenizer`, `write_preprocessor_config` and `write_model` to build a folder, or the
`qwen_reference` fixture (import it into the test module) for one shared per module.
`qwen_tiny_reference` (and its load `qwen_tiny_ours`): `qwen2_5_vl.tiny()` saved by transformers, weights and config
only, shared by test_qwen2_5_vl.py and test_models_contract.py.
"""


import numpy as np
import pytest
import torch
from helpers import float32_bound, perturb_
from PIL import Image

from editr1_jax import tiny
from editr1_jax.models import qwen2_5_vl as qv
from editr1_jax.tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL

CORPUS = ("You are a helpful assistant. The first image is the source, the second the edited result. "
          "Instruction: replace the cat with a fox; make the sky red; remove the car. Requirement: keep the "
          "background unchanged. Rate the edit from 0 to 5 and answer with the digit only.")
# Preprocessing bounds that make the test images resize (min 2x2 merged patches, max 20).
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 20
# float32 rounding of tiny logits (helpers.float32_bound): the patch embedding (K = 3 x 2 x 14 x 14) is the longest
# reduction; <= 51 in sequence: patch 1, 3 vision blocks x 9 (qv.tiny; 2 here), merger 3, 2 layers x 9, norm, head.
QWEN_BOUND = float32_bound(3 * 2 * 14 * 14, depth=51)  # 5.8e-5


def special_ids(vocab_size: int) -> dict[str, int]:
  return {t: vocab_size + i for i, t in enumerate(QWEN_SPECIAL)}


def write_tokenizer(folder: str, chat_template: str = QWEN_CHAT_TEMPLATE, bpe_size: int = 320,
                    corpus: str = CORPUS) -> dict[str, int]:
  """`editr1_jax.tiny`'s Qwen2 tokenizer trained on CORPUS; returns {special token: id}."""
  return tiny.write_qwen_tokenizer(folder, corpus, bpe_size=bpe_size, chat_template=chat_template)


def write_preprocessor_config(folder: str, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, **extra) -> None:
  tiny.write_qwen_preprocessor_config(folder, min_pixels, max_pixels, **extra)


def tiny_config(ids: dict[str, int], text: dict | None = None, vision: dict | None = None):
  """Two vision blocks (block 1 full attention, block 0 windowed), two decoder layers, GQA, M-RoPE (1, 1, 2);
  `text` / `vision` override fields (the benchmark uses real widths)."""
  from transformers import Qwen2_5_VLConfig
  vocab = max(ids.values()) + 1
  text_config = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                     bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]) | (text or {})
  vision_config = dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=32,
                       window_size=112, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2) | (vision or {})
  return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config,
                          image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                          vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                          tie_word_embeddings=False)


def write_model(folder: str, seed: int = 0, **preprocessor):
  """Tokenizer, preprocessor config and a perturbed tiny Qwen2_5_VLForConditionalGeneration in one folder."""
  from transformers import Qwen2_5_VLForConditionalGeneration
  ids = write_tokenizer(folder)
  write_preprocessor_config(folder, **preprocessor)
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(tiny_config(ids)).eval()
  perturb_(model, seed=seed)
  model.save_pretrained(folder)
  # Reloaded, so the rotary tables (non-persistent buffers perturb_ also touched) come from the config again.
  return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()


def reference_chat_ids(tokenizer, text: str, grids) -> list[int]:
  """transformers' way: apply_chat_template (one user turn: the images, then the text), each
  <|image_pad|> expanded to t*h*w/4 pads as Qwen2_5_VLProcessor does, then the tokenizer."""
  content = [{"type": "image"}] * len(grids) + [{"type": "text", "text": text}]
  rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
  parts = rendered.split("<|image_pad|>")
  assert len(parts) == len(grids) + 1
  expanded = parts[0] + "".join("<|image_pad|>" * (int(np.prod(g)) // 4) + p for g, p in zip(grids, parts[1:]))
  return tokenizer(expanded)["input_ids"]


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture(scope="module")
def qwen_reference(tmp_path_factory):
  """(torch model, folder) of a tiny perturbed Qwen2.5-VL with tokenizer and preprocessor config."""
  folder = str(tmp_path_factory.mktemp("qwen2_5_vl"))
  return write_model(folder), folder


# --------------------------------------------------------------------------------------------------
def hf_config(cfg: qv.Qwen25VLConfig) -> dict:
  """The transformers config of one of our configs (kwargs of `Qwen2_5_VLConfig`)."""
  v = cfg.vision
  return dict(
      text_config=dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
                       rope_parameters=dict(rope_type="default", mrope_section=list(cfg.mrope_section),
                                            rope_theta=cfg.rope_theta)),
      vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                         num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, window_size=v.window_size,
                         fullatt_block_indexes=list(v.fullatt_block_indexes)),
      image_token_id=cfg.image_token_id, vision_start_token_id=cfg.vision_start_token_id,
      vision_end_token_id=cfg.vision_end_token_id, tie_word_embeddings=cfg.tie_word_embeddings)


def save_reference(cfg, folder):
  """A perturbed Qwen2_5_VLForConditionalGeneration of our config `cfg`, saved to `folder`; eager attention."""
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(0)
  model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config(cfg))).eval()
  # perturb_ also moves the rotary frequency buffers, which are not saved: put those back.
  rotary = {n: b.clone() for n, b in model.named_buffers() if "inv_freq" in n}
  perturb_(model)
  with torch.no_grad():
    for n, b in model.named_buffers():
      if n in rotary:
        b.copy_(rotary[n])
  model.save_pretrained(folder)
  model.config._attn_implementation = "eager"
  return model


@pytest.fixture(scope="session")
def qwen_tiny_reference(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen") / "model")
  return save_reference(qv.tiny(), folder), folder


@pytest.fixture(scope="session")
def qwen_tiny_ours(qwen_tiny_reference):
  return qv.load_qwen2_5_vl(qwen_tiny_reference[1])
