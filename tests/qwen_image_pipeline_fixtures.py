"""A complete tiny Qwen-Image-Edit-2509 pipeline folder in diffusers' layout, and diffusers' own
`QwenImageEditPlusPipeline` reading the same files, for end-to-end comparisons of the `qwen_image_edit` family.

The folder: model_index.json, transformer/ (a tiny `QwenImageTransformer2DModel`), vae/ (a tiny
`AutoencoderKLQwenImage`), text_encoder/ (a tiny `Qwen2_5_VLForConditionalGeneration` sized to the shipped tiny
tokenizer), tokenizer/ and processor/ (that tokenizer and its preprocessor_config.json, whose small max_pixels keeps
the VL's image tokens few), scheduler/ (Qwen-Image's scheduler_config.json); every tensor perturbed. The modules are
sized to each other: the transformer's text width is the VL's hidden size and its token channels are 4 x the VAE's
latent channels (2x2 packing).
Import the fixture into a test module (`from qwen_image_pipeline_fixtures import qwen_edit_pipeline`).
"""

import json
import os
import shutil

import pytest
import torch
from helpers import perturb_
from qwen_fixtures import tiny_config
from qwen_image_fixtures import TINY
from test_qwen_image_conditioning import reference_processor
from test_qwen_image_vae import diffusers_config as vae_config

from editr1_jax import tiny
from editr1_jax.models import qwen_image_vae as qvae

# Qwen-Image(-Edit-2509)'s scheduler/scheduler_config.json (the fields that differ from diffusers' defaults).
SCHEDULER = dict(base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift_terminal=0.02,
                 use_dynamic_shifting=True, time_shift_type="exponential", shift=1.0, num_train_timesteps=1000)
MODEL_INDEX = {"_class_name": "QwenImageEditPlusPipeline", "_diffusers_version": "0.42.1",
               "processor": ["transformers", "Qwen2VLProcessor"],
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
               "tokenizer": ["transformers", "Qwen2Tokenizer"],
               "transformer": ["diffusers", "QwenImageTransformer2DModel"],
               "vae": ["diffusers", "AutoencoderKLQwenImage"]}


def write_pipeline_folder(root: str, seed: int = 0) -> str:
  """Writes the tiny pipeline under `root` (created); every module drawn from `seed`, then perturbed."""
  from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
  from tokenizers import Tokenizer
  from transformers import Qwen2_5_VLForConditionalGeneration
  judge = os.path.join(tiny.ASSETS, "judge")  # tokenizer files + preprocessor_config.json
  for sub in ("processor", "tokenizer"):
    shutil.copytree(judge, os.path.join(root, sub))
  vocab = Tokenizer.from_file(os.path.join(judge, "tokenizer.json"))
  vl_config = tiny_config({t: vocab.token_to_id(t) for t in tiny.QWEN_SPECIAL})
  vae_cfg = qvae.tiny()
  torch.manual_seed(seed)
  modules = {
      "text_encoder": Qwen2_5_VLForConditionalGeneration(vl_config),
      "vae": AutoencoderKLQwenImage(**vae_config(vae_cfg)),
      "transformer": QwenImageTransformer2DModel(**dict(TINY, in_channels=4 * vae_cfg.z_dim, out_channels=vae_cfg.z_dim,
                                                        joint_attention_dim=vl_config.text_config.hidden_size)),
  }
  for i, (sub, module) in enumerate(modules.items()):
    perturb_(module, seed=seed + i)
    module.save_pretrained(os.path.join(root, sub))
  FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(os.path.join(root, "scheduler"))
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump(MODEL_INDEX, f, indent=2)
  return root


def with_mrope_positions(text_encoder):
  """transformers 5 gives the image tokens Qwen2.5-VL's M-RoPE positions only when the forward gets
  `mm_token_type_ids`, which diffusers 0.42's pipeline does not pass (it would fall back to sequential positions,
  unlike the transformers 4 the model was trained with, and unlike ours); this adds them from the input ids, as the
  processor makes them. The same fix as test_qwen_image_conditioning's `pipe`."""
  forward, image_token = text_encoder.forward, text_encoder.config.image_token_id
  text_encoder.forward = lambda **kw: forward(**kw, mm_token_type_ids=(kw["input_ids"] == image_token).int())
  return text_encoder


def reference_pipeline(folder: str, transformer=None):
  """diffusers' `QwenImageEditPlusPipeline` over the folder's modules, each read by its own `from_pretrained`, with
  test_qwen_image_conditioning's stand-in processor (transformers' needs torchvision); `transformer` replaces the
  folder's."""
  from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                         QwenImageTransformer2DModel)
  from transformers import Qwen2_5_VLForConditionalGeneration
  from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
  sub = lambda name: os.path.join(folder, name)  # noqa: E731
  text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(sub("text_encoder")).eval()
  if transformer is None:
    transformer = QwenImageTransformer2DModel.from_pretrained(sub("transformer")).eval()
  return QwenImageEditPlusPipeline(
      scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(sub("scheduler")),
      vae=AutoencoderKLQwenImage.from_pretrained(sub("vae")).eval(), text_encoder=with_mrope_positions(text_encoder),
      tokenizer=Qwen2Tokenizer.from_pretrained(sub("tokenizer")),
      processor=reference_processor(sub("processor"), Qwen2Tokenizer.from_pretrained(sub("processor"))),
      transformer=transformer)


@pytest.fixture(scope="session")
def qwen_edit_pipeline(tmp_path_factory):
  """(folder, diffusers pipeline over it)."""
  folder = write_pipeline_folder(str(tmp_path_factory.mktemp("qwen_image_edit_pipeline")))
  return folder, reference_pipeline(folder)
