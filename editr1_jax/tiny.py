"""Tiny random models for the CPU demo (`configs/tiny.py`) and the tests, and the small tokenizer
files they read (shipped in `editr1_jax/assets/tiny/`, written by this module).

The sizes fit together as in the real pipeline: the transformer's text width is T5's d_model, its
pooled width CLIP's hidden size, its token channels 4x the VAE's latent channels. Weights are drawn
from the seed; the tokenizers are trained in code on the demo instructions and the judging prompt.

  python -m editr1_jax.tiny --write-assets   # rewrite editr1_jax/assets/tiny/
"""

import argparse
import dataclasses
import glob
import json
import os

from flax import nnx

from editr1_jax import sharding as shd
from editr1_jax.conditioning import TextEncoders, load_tokenizers
from editr1_jax.layers import LoraSpec
from editr1_jax.models import autoencoder, clip, flux, qwen2_5_vl, qwen_image, qwen_image_vae, t5

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")
DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo")
JUDGE_PROMPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reward", "judge_prompt.txt")

CLIP_MAX_LENGTH = 77
CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
T5_SPECIAL = ("<pad>", "</s>", "<unk>")
T5_EXTRA_IDS = 3
# The special tokens of the Qwen2.5-VL vocabulary, in its order (151643 ...), appended after the trained BPE.
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# The Qwen2.5-VL-Instruct chat template (system default, images as vision_start/image_pad/vision_end).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2.5-VL's preprocessing constants; the tiny judge's pixel bounds keep 64x64 images at 4x4 patches.
QWEN_PREPROCESSOR = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                     "processor_class": "Qwen2_5_VLProcessor"}
TINY_JUDGE_PIXELS = (28 * 28 * 4, 28 * 28 * 16)


# --------------------------------------------------------------------------------------------------
# Tokenizers trained in code (transformers' tokenizer classes, no torch).
def write_clip_tokenizer(folder: str, corpus, vocab_size: int = 400):
  """CLIP's byte-level BPE layout: normaliser, pre-tokeniser, `</w>` suffix, special tokens last (so the
  end-of-text token has the highest id, as in CLIP's vocab)."""
  from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
  from transformers.models.clip.tokenization_clip import CLIPTokenizer
  bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
  bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                         normalizers.Lowercase()])
  bpe.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                           behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(list(corpus), trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                                            end_of_word_suffix="</w>", show_progress=False))
  merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
  # Every byte, every byte ending a word, the merges, then the special tokens.
  tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + list(CLIP_SPECIAL)
  vocab = {}
  for t in tokens:
    vocab.setdefault(t, len(vocab))
  tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
  tok.save_pretrained(folder)
  return tok


def write_t5_tokenizer(folder: str, corpus, vocab_size: int = 120):
  """A Unigram model with T5's `<pad>` `</s>` `<unk>` first and a few sentinels."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers.models.t5.tokenization_t5 import T5Tokenizer
  unigram = Tokenizer(models.Unigram())
  unigram.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
  unigram.train_from_iterator(list(corpus), trainers.UnigramTrainer(
      vocab_size=vocab_size, special_tokens=list(T5_SPECIAL), unk_token="<unk>", show_progress=False))
  vocab = [tuple(v) for v in json.loads(unigram.to_str())["model"]["vocab"]]
  if [v[0] for v in vocab[:3]] != list(T5_SPECIAL):  # T5Tokenizer wants pad 0, eos 1, unk 2
    raise ValueError(f"unigram training put {vocab[:3]} first, not {T5_SPECIAL}")
  tok = T5Tokenizer(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=512)
  tok.save_pretrained(folder)
  return tok


def write_qwen_tokenizer(folder: str, corpus: str, bpe_size: int = 320,
                         chat_template: str = QWEN_CHAT_TEMPLATE) -> dict[str, int]:
  """A Qwen2-style tokenizer folder (tokenizer.json, tokenizer_config.json naming Qwen2Tokenizer, the chat
  template); returns {special token: id}. Digits are single byte-level tokens, as in Qwen2."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([corpus] * 4, trainers.BpeTrainer(
      vocab_size=bpe_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  n = tok.get_vocab_size()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  fast.chat_template = chat_template
  fast.save_pretrained(folder)
  path = os.path.join(folder, "tokenizer_config.json")
  with open(path) as f:
    config = json.load(f)
  config["tokenizer_class"] = "Qwen2Tokenizer"  # as on the hub: transformers rebuilds its Qwen2 pipeline
  with open(path, "w") as f:
    json.dump(config, f, indent=2)
  return {t: n + i for i, t in enumerate(QWEN_SPECIAL)}


def write_qwen_preprocessor_config(folder: str, min_pixels: int, max_pixels: int, **extra) -> None:
  """The hub's Qwen2.5-VL preprocessor_config.json fields, with the given pixel bounds."""
  config = {"min_pixels": min_pixels, "max_pixels": max_pixels, **QWEN_PREPROCESSOR, **extra}
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump(config, f, indent=2)


def demo_corpus(dataset_dir: str = DEMO_DATA) -> list[str]:
  """The demo's instructions and requirements and the judging prompt: what the tiny tokenizers will see."""
  texts = []
  for path in sorted(glob.glob(os.path.join(dataset_dir, "*_metadata.jsonl"))):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        texts += [record["prompt"], record["requirement"]]
  with open(JUDGE_PROMPT) as f:
    texts.append(f.read())
  return texts


def write_assets(root: str = ASSETS) -> None:
  """tokenizer/ (CLIP), tokenizer_2/ (T5) and judge/ (Qwen2.5-VL tokenizer, template, preprocessing)."""
  corpus = demo_corpus()
  write_clip_tokenizer(os.path.join(root, "tokenizer"), corpus)
  write_t5_tokenizer(os.path.join(root, "tokenizer_2"), corpus)
  judge = os.path.join(root, "judge")
  os.makedirs(judge, exist_ok=True)
  write_qwen_tokenizer(judge, "\n".join(corpus))
  write_qwen_preprocessor_config(judge, *TINY_JUDGE_PIXELS)


# --------------------------------------------------------------------------------------------------
# Models drawn from a seed, sized to the shipped tokenizers and to each other.
def tiny_text_configs(root: str = ASSETS, **runtime) -> tuple[clip.CLIPTextConfig, t5.T5Config]:
  """The tiny CLIP and T5 configs, their vocabularies sized to the shipped tokenizers."""
  clip_tok, t5_tok = load_tokenizers(root)
  # The legacy CLIP config of FLUX (eos_token_id 2): the pooled token is the highest id, end-of-text.
  clip_cfg = dataclasses.replace(clip.tiny(**runtime), vocab_size=len(clip_tok),
                                 max_position_embeddings=CLIP_MAX_LENGTH)
  t5_cfg = dataclasses.replace(t5.tiny(**runtime), vocab_size=len(t5_tok) + 5)  # a little larger, as the real one
  return clip_cfg, t5_cfg


def tiny_text_encoders(seed: int, max_sequence_length: int, *, root: str = ASSETS, mesh=None,
                       rules=shd.DEFAULT_RULES, attention_impl: str = "auto") -> TextEncoders:
  clip_tok, t5_tok = load_tokenizers(root)
  clip_cfg, t5_cfg = tiny_text_configs(root, attention_impl=attention_impl)
  clip_model = clip.CLIPTextModel(clip_cfg, rngs=nnx.Rngs(seed))
  t5_model = t5.T5EncoderModel(t5_cfg, rngs=nnx.Rngs(seed + 1))
  return TextEncoders(clip_tok, t5_tok, _placed(clip_model, mesh, rules), _placed(t5_model, mesh, rules),
                      max_sequence_length=max_sequence_length, mesh=mesh, rules=rules)


def tiny_flux_config(lora: LoraSpec | None = None, **runtime) -> flux.FluxConfig:
  """`flux.tiny()` wired to the tiny encoders: text width = T5 d_model, pooled width = CLIP hidden size,
  token channels = 4 x VAE latent channels."""
  return dataclasses.replace(flux.tiny(lora=lora, **runtime), joint_attention_dim=t5.tiny().d_model,
                             pooled_projection_dim=clip.tiny().hidden_size,
                             in_channels=4 * autoencoder.tiny().latent_channels)


def tiny_transformer(seed: int, lora: LoraSpec | None = None, *, mesh=None, rules=shd.DEFAULT_RULES,
                     **runtime) -> flux.FluxTransformer:
  return _placed(flux.FluxTransformer(tiny_flux_config(lora, **_storage(runtime)), rngs=nnx.Rngs(seed + 2)), mesh,
                 rules)


def tiny_vae(seed: int, *, mesh=None, rules=shd.DEFAULT_RULES,
             attention_impl: str = "auto") -> autoencoder.Autoencoder:
  cfg = autoencoder.tiny(attention_impl=attention_impl)
  return _placed(autoencoder.Autoencoder(cfg, rngs=nnx.Rngs(seed + 3)), mesh, rules)


def tiny_qwen_image_config(lora: LoraSpec | None = None, **runtime) -> qwen_image.QwenImageConfig:
  """`qwen_image.tiny()` wired to the tiny encoders: text width = the tiny Qwen2.5-VL's hidden size, token
  channels = 4 x the tiny Qwen-Image VAE's latent channels."""
  return qwen_image.tiny(lora=lora, **runtime).replace(joint_attention_dim=qwen2_5_vl.tiny().hidden_size,
                                                       in_channels=4 * qwen_image_vae.tiny().z_dim,
                                                       out_channels=qwen_image_vae.tiny().z_dim)


def tiny_qwen_image_transformer(seed: int, lora: LoraSpec | None = None, *, mesh=None, rules=shd.DEFAULT_RULES,
                                **runtime) -> qwen_image.QwenImageTransformer:
  cfg = tiny_qwen_image_config(lora, **_storage(runtime))
  return _placed(qwen_image.QwenImageTransformer(cfg, rngs=nnx.Rngs(seed + 5)), mesh, rules)


def tiny_qwen_image_vae(seed: int, *, mesh=None, rules=shd.DEFAULT_RULES,
                        attention_impl: str = "auto") -> qwen_image_vae.QwenImageVAE:
  cfg = qwen_image_vae.tiny(attention_impl=attention_impl)
  return _placed(qwen_image_vae.QwenImageVAE(cfg, rngs=nnx.Rngs(seed + 6)), mesh, rules)


def tiny_qwen_text_encoder(seed: int, max_sequence_length: int, *, mesh=None, rules=shd.DEFAULT_RULES,
                           attention_impl: str = "auto"):
  """Qwen-Image-Edit's prompt encoder with a random tiny Qwen2.5-VL and the shipped tiny tokenizer."""
  from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

  from editr1_jax.qwen_image_conditioning import TEMPLATE, QwenImageTextEncoder
  from editr1_jax.reward.processor import ImageProcessorConfig
  folder = os.path.join(ASSETS, "judge")
  cfg = tiny_judge_config(folder, attention_impl=attention_impl)
  model = _placed(qwen2_5_vl.Qwen25VL(cfg, rngs=nnx.Rngs(seed + 7)), mesh, rules)
  tokenizer = Qwen2Tokenizer.from_pretrained(folder)
  # The pipeline drops the template's system turn (64 tokens in Qwen2.5's vocabulary): here, its length in ours.
  drop = len(tokenizer(TEMPLATE.split("{}")[0])["input_ids"])
  return QwenImageTextEncoder(model, tokenizer, ImageProcessorConfig.from_folder(folder),
                              max_sequence_length=max_sequence_length, drop=drop, mesh=mesh, rules=rules)


def tiny_judge_config(folder: str = os.path.join(ASSETS, "judge"), **runtime) -> qwen2_5_vl.Qwen25VLConfig:
  """`qwen2_5_vl.tiny()` with its vocabulary and image token ids taken from the shipped tokenizer."""
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  ids = {t: tok.token_to_id(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")}
  return dataclasses.replace(qwen2_5_vl.tiny(**runtime), vocab_size=tok.get_vocab_size(),
                             image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                             vision_end_token_id=ids["<|vision_end|>"])


def tiny_judge_model(seed: int, *, mesh=None, rules=shd.DEFAULT_RULES,
                     attention_impl: str = "auto") -> qwen2_5_vl.Qwen25VL:
  """The MLLM judge's random tiny Qwen2.5-VL (`reward.mllm.MllmJudge.tiny` reads it with the shipped tokenizer)."""
  cfg = tiny_judge_config(attention_impl=attention_impl)
  return _placed(qwen2_5_vl.Qwen25VL(cfg, rngs=nnx.Rngs(seed + 4)), mesh, rules)


def _storage(runtime: dict) -> dict:
  """Runtime settings with the parameters stored in the compute dtype unless `param_dtype` says otherwise."""
  if runtime.get("param_dtype") is None:
    runtime = dict(runtime, param_dtype=runtime.get("dtype", "float32"))
  return runtime


def _placed(model, mesh, rules):
  if mesh is None:
    return model
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, shd.shard_state(state, mesh, rules))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--write-assets", action="store_true", help=f"rewrite the tokenizer files in {ASSETS}")
  args = parser.parse_args()
  if not args.write_assets:
    parser.error("nothing to do: pass --write-assets")
  write_assets()
  size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(ASSETS, "**", "*"), recursive=True)
             if os.path.isfile(p))
  print(f"wrote {ASSETS} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
