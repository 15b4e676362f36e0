"""Qwen-Image-Edit-2511's transformer (zero_cond_t: condition-image tokens modulated at t = 0) against diffusers
0.42.1, through our loader: forward parity for one and two condition images of other sizes (non-square grids, text
padding), LoRA forward and gradient parity against peft, scanned and unscanned blocks, every remat policy; and that
the flag matters far beyond the bound."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import max_rel_err, perturb_
from qwen_image_fixtures import (EXACT, LORA, ONE_REFERENCE, QWEN_IMAGE_BOUND, QWEN_IMAGE_REAL_BOUND, REAL, TINY,
                                 TWO_REFERENCES, make_inputs, torch_forward, write_lora_reference)

from editr1_jax.models import qwen_image as qi


@pytest.fixture(scope="module")
def reference_2511(tmp_path_factory):
  """(diffusers model with zero_cond_t, its folder)."""
  from diffusers import QwenImageTransformer2DModel
  torch.manual_seed(0)
  model = QwenImageTransformer2DModel(**TINY, zero_cond_t=True).eval()
  perturb_(model)
  folder = str(tmp_path_factory.mktemp("qwen_image_2511") / "transformer")
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope="module")
def lora_2511(reference_2511, tmp_path_factory):
  """(peft model, LoRA file) on the 2511 base."""
  return write_lora_reference(reference_2511[1], str(tmp_path_factory.mktemp("qwen_image_2511_lora")))


def test_the_folder_says_zero_cond_t(reference_2511):
  model = qi.load_qwen_image_transformer(reference_2511[1])
  assert model.cfg == qi.tiny(zero_cond_t=True) and model.cfg.to_diffusers_config()["zero_cond_t"] is True
  assert qi.edit_2511() == qi.edit_2509().replace(zero_cond_t=True)


@pytest.mark.parametrize("shapes,t,bound", [(ONE_REFERENCE, EXACT, QWEN_IMAGE_BOUND),
                                            (TWO_REFERENCES, EXACT, QWEN_IMAGE_BOUND),
                                            (TWO_REFERENCES, REAL, QWEN_IMAGE_REAL_BOUND)])
@pytest.mark.parametrize("scan", [True, False])
def test_forward_parity(reference_2511, shapes, t, bound, scan):
  """Row 2's text padded; the bounds are 2509's (qwen_image_fixtures): t = 0's embedding is one more pass through
  the same time MLP, no longer reduction."""
  ours = qi.load_qwen_image_transformer(reference_2511[1], scan_blocks=scan)
  inputs = make_inputs(shapes, t)
  ref = torch_forward(reference_2511[0], inputs)
  assert max_rel_err(ours(**inputs), ref) <= bound
  # the jitted path: positions and the target's token count instead of img_shapes
  positions = qi.rope_positions(inputs["img_shapes"], inputs["encoder_hidden_states"].shape[1])
  arrays = {k: v for k, v in inputs.items() if k != "img_shapes"}
  target = int(np.prod(shapes[0]))
  jitted = jax.jit(lambda m, x, p: m(**x, positions=p, target_tokens=target))(ours, arrays, positions)
  assert max_rel_err(jitted, ref) <= bound


def test_the_flag_matters(reference_2511):
  """The same weights with zero_cond_t off, ours and diffusers', differ from 2511 far beyond the bound."""
  from diffusers import QwenImageTransformer2DModel
  inputs = make_inputs(TWO_REFERENCES, REAL)
  on = qi.load_qwen_image_transformer(reference_2511[1])
  off = nnx.merge(*nnx.split(on))
  off.cfg = on.cfg.replace(zero_cond_t=False)
  ref_off = QwenImageTransformer2DModel(**TINY).eval()
  ref_off.load_state_dict(reference_2511[0].state_dict())
  assert max_rel_err(off(**inputs), torch_forward(ref_off, inputs)) <= QWEN_IMAGE_REAL_BOUND
  assert max_rel_err(on(**inputs), off(**inputs)) > 100 * QWEN_IMAGE_REAL_BOUND
  with pytest.raises(ValueError, match=r"zero_cond_t: target_tokens must be the target image's token count"):
    positions = qi.rope_positions(inputs["img_shapes"], inputs["encoder_hidden_states"].shape[1])
    on(**{k: v for k, v in inputs.items() if k != "img_shapes"}, positions=positions)


def _torch_lora_grads(model, inputs, folder):
  """d mean(out^2) / d(LoRA weights) of the peft model, saved as a LoRA file (so our loader maps the names)."""
  from diffusers import QwenImageEditPlusPipeline
  from peft.utils import get_peft_model_state_dict
  model.zero_grad()
  args = {k: v if k == "img_shapes" else torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
  torch.mean(torch.square(model(**args).sample)).backward()
  names = get_peft_model_state_dict(model).keys()
  params = dict(model.named_parameters())
  grads = {}
  for name in names:  # the state dict drops peft's adapter name ("default")
    key = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
    grad = params[key].grad  # None: the parameter does not reach the loss
    grads[name] = torch.zeros_like(params[key]) if grad is None else grad.detach().clone()
  QwenImageEditPlusPipeline.save_lora_weights(folder, transformer_lora_layers=grads)
  return os.path.join(folder, "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("remat", ["none", "full", "flux"])
def test_lora_forward_and_gradient_parity(reference_2511, lora_2511, tmp_path, remat):
  inputs = make_inputs(TWO_REFERENCES, EXACT)
  model = qi.load_qwen_image_transformer(reference_2511[1], lora=LORA, lora_weights=lora_2511[1], remat=remat)
  assert max_rel_err(model(**inputs), torch_forward(lora_2511[0], inputs)) <= QWEN_IMAGE_BOUND
  graphdef, adapters, base = qi.split_params(model)
  ours = jax.jit(jax.grad(lambda a: jnp.mean(jnp.square(nnx.merge(graphdef, a, base)(**inputs)))))(adapters)
  path = _torch_lora_grads(lora_2511[0], inputs, str(tmp_path))
  theirs = qi.load_lora_weights(adapters, path, LORA.alpha / LORA.rank)
  checked = 0
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    b = np.asarray(b)
    if not np.any(b):  # the last block's text-only adapters do not reach the output: gradient 0 both ways
      assert not np.any(np.asarray(a))
      continue
    # the backward pass doubles the chain of float32 roundings the forward bound counts
    assert max_rel_err(a, b) <= 2 * QWEN_IMAGE_BOUND
    checked += 1
  assert checked >= 8
