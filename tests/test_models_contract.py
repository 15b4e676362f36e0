"""The contract every model port keeps, one parametrised test per property over the registry `CASES`:

- loader errors: the tiny reference checkpoint with one tensor missing, one unexpected or one mis-shaped, read by
  the model's real `load_*`, is refused with a CheckpointError naming the folder, the kind and the tensor;
- full size: our model at the real size (nnx.eval_shape, no memory) has the reference's parameter count, every
  tensor of the reference (the PyTorch model on the meta device) maps to one of ours with its shape, and every
  parameter has logical axes to shard it by;
- parity: the tiny reference (every tensor perturbed, saved by diffusers / transformers) read through our
  safetensors loader gives the PyTorch forward's outputs up to float32 rounding (the bounds and their derivations
  sit next to each model's fixtures: helpers.float32_bound).

The tiny references are the session fixtures the models' own test files use too. What is particular to one model
(LoRA, window attention, relative position buckets, pooling rules, VAE padding, dtypes, sharding, config errors)
stays in that model's test file.
"""

import dataclasses
import functools
import math
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from flux_fixtures import EXACT, FLUX_BOUND, REAL, TINY, make_inputs, torch_forward, vae_diffusers_config
from helpers import max_rel_err
from qwen_fixtures import QWEN_BOUND, hf_config
from qwen_image_fixtures import EXACT as QI_EXACT
from qwen_image_fixtures import ONE_REFERENCE, QWEN_IMAGE_BOUND, QWEN_IMAGE_REAL_BOUND, TWO_REFERENCES
from qwen_image_fixtures import REAL as QI_REAL
from qwen_image_fixtures import make_inputs as qwen_image_inputs
from qwen_image_fixtures import torch_forward as qwen_image_forward
from test_autoencoder import DECODE_BOUND, ENCODE_BOUND, IMAGES, LATENTS, nchw, nhwc
from test_clip import CLIP_L, make_ids
from test_clip import torch_forward as clip_forward
from test_qwen2_5_vl import make_inputs as qwen_inputs
from test_qwen2_5_vl import torch_logits
from test_t5 import LENGTH, T5_XXL, padded_batch
from test_t5 import torch_forward as t5_forward
from text_fixtures import CLIP_BOUND, CLIP_MAX_LENGTH, CLIP_TINY, T5_BOUND, T5_TINY

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.models import autoencoder as ae
from editr1_jax.models import clip, flux, t5
from editr1_jax.models import qwen2_5_vl as qv
from editr1_jax.models import qwen_image as qi


@dataclasses.dataclass(frozen=True)
class Output:
  """One output of a parity forward, ours and the reference's."""
  name: str
  ours: Any
  ref: np.ndarray
  shape: tuple[int, ...]  # both sides must have it
  parts: tuple = (Ellipsis,)  # index expressions compared one by one (each max_rel_err <= the bound); padding left out


@dataclasses.dataclass(frozen=True)
class Parity:
  id: str
  bound: float  # on max_rel_err
  run: Callable[[Any, Any], list[Output]]  # (reference torch model, our loaded model) -> outputs


@dataclasses.dataclass(frozen=True)
class FullSize:
  preset: Callable[[], Any]  # our config at the real size
  reference: Callable[[], Any]  # the PyTorch model (built on the meta device)
  names: Callable[[Any], dict[str, tuple[int, ...]]]  # reference model -> {tensor name: shape}, as its checkpoint
  n_params: int  # the reference number
  n_tensors: int  # len(names)
  config: Callable[[Any], Any]  # reference model -> our config read from its config (must equal the preset)

  @property
  def id(self) -> str:
    return self.preset.__name__


@dataclasses.dataclass(frozen=True)
class ModelCase:
  name: str
  reference: str  # fixture: (torch model, folder) of the tiny reference
  ours: str  # fixture: the tiny reference read by `load`
  load: Callable[[str], Any]  # our loader
  module: Callable[..., Any]  # our model class: module(config, rngs=...)
  table: tuple  # our weight table
  # loader errors
  missing: str  # a tensor left out
  unexpected: str  # a tensor added: a copy of `unexpected_like`, or zeros (2, 2) when None
  unexpected_like: str | None
  misshaped: str  # a tensor cut by one entry on `misshaped_axis`
  misshaped_axis: int
  misshaped_shapes: str  # what the error says about it
  full_size: tuple[FullSize, ...]
  parity: tuple[Parity, ...]


def _state_dict_shapes(ref) -> dict[str, tuple[int, ...]]:
  return {n: tuple(p.shape) for n, p in ref.state_dict().items()}


def _parameter_shapes(ref) -> dict[str, tuple[int, ...]]:
  # named_parameters lists a tied tensor once (T5: the input embedding as `shared.weight`)
  return {n: tuple(p.shape) for n, p in ref.named_parameters()}


# --------------------------------------------------------------------------------------------------
# FLUX transformer
def _flux_reference():
  from diffusers import FluxTransformer2DModel
  return FluxTransformer2DModel(guidance_embeds=True)


def _flux_parity(regime):
  def run(reference, ours):
    inputs = make_inputs(**regime)
    return [Output("sample", ours(**inputs), torch_forward(reference, inputs), (2, 22, TINY["in_channels"]))]
  return run


FLUX = ModelCase(
    name="flux", reference="reference", ours="ours", load=flux.load_flux_transformer, module=flux.FluxTransformer,
    table=flux.FLUX_WEIGHTS,
    missing="transformer_blocks.1.attn.add_k_proj.weight",
    unexpected="transformer_blocks.1.attn.bogus.weight", unexpected_like=None,
    misshaped="transformer_blocks.1.attn.add_k_proj.weight", misshaped_axis=-1,
    misshaped_shapes="checkpoint (32, 31), model expects (32, 32)",
    full_size=(FullSize(flux.kontext_dev, _flux_reference, _state_dict_shapes, n_params=11_901_408_320,
                        n_tensors=1160, config=lambda ref: flux.FluxConfig.from_diffusers_config(dict(ref.config))),),
    # EXACT / REAL and why they differ (the sinusoid arguments' size): flux_fixtures
    parity=(Parity("exact", FLUX_BOUND, _flux_parity(EXACT)), Parity("real_timesteps", 1e-4, _flux_parity(REAL))))


# --------------------------------------------------------------------------------------------------
# FLUX VAE
def _vae_reference():
  from diffusers import AutoencoderKL
  return AutoencoderKL(**vae_diffusers_config(ae.flux()))


def _vae_encode(reference, ours):
  with torch.no_grad():
    ref = nhwc(reference.encode(nchw(IMAGES)).latent_dist.mode())
  return [Output("latent mean", ours.encode(IMAGES), ref, (2, 7, 11, 4))]


def _vae_decode(reference, ours):
  with torch.no_grad():
    ref = nhwc(reference.decode(nchw(LATENTS)).sample)
  return [Output("image", ours.decode(LATENTS), ref, (2, 28, 44, 3))]


AUTOENCODER = ModelCase(
    name="autoencoder", reference="vae_reference", ours="vae_ours", load=ae.load_autoencoder, module=ae.Autoencoder,
    table=ae.AUTOENCODER_WEIGHTS,
    missing="decoder.mid_block.attentions.0.to_k.weight",
    unexpected="decoder.mid_block.attentions.0.bogus.weight", unexpected_like=None,
    misshaped="decoder.mid_block.attentions.0.to_k.weight", misshaped_axis=-1,
    misshaped_shapes="checkpoint (16, 15), model expects (16, 16)",
    full_size=(FullSize(ae.flux, _vae_reference, _state_dict_shapes, n_params=83_819_683, n_tensors=244,
                        config=lambda ref: ae.AutoencoderConfig.from_diffusers_config(vae_diffusers_config(ae.flux()))),),
    # ENCODE_BOUND / DECODE_BOUND: float32 rounding, derived in test_autoencoder
    parity=(Parity("encode", ENCODE_BOUND, _vae_encode), Parity("decode", DECODE_BOUND, _vae_decode)))


# --------------------------------------------------------------------------------------------------
# CLIP text encoder
def _clip_reference():
  from transformers import CLIPTextConfig, CLIPTextModel
  return CLIPTextModel(CLIPTextConfig(**CLIP_L))


def _clip_eos_at_different_positions(reference, ours):
  ids = make_ids([5, 17, 76])
  ref_hidden, ref_pooled = clip_forward(reference, ids)
  hidden, pooled = ours(ids)
  # the pooled row is the end-of-text token's hidden state, and the three rows differ
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(hidden)[np.arange(3), [5, 17, 76]])
  width = CLIP_TINY["hidden_size"]
  return [Output("hidden", hidden, ref_hidden, (3, CLIP_MAX_LENGTH, width)), Output("pooled", pooled, ref_pooled, (3, width))]


CLIP = ModelCase(
    name="clip", reference="clip_reference", ours="clip_ours", load=clip.load_clip_text, module=clip.CLIPTextModel,
    table=clip.CLIP_WEIGHTS,
    missing="encoder.layers.1.mlp.fc2.bias",
    unexpected="encoder.layers.1.mlp.fc3.weight", unexpected_like=None,
    misshaped="final_layer_norm.weight", misshaped_axis=0,
    misshaped_shapes="checkpoint (31,), model expects (32,)",
    full_size=(FullSize(clip.clip_l, _clip_reference, _parameter_shapes, n_params=123_060_480, n_tensors=196,
                        config=lambda ref: clip.CLIPTextConfig.from_transformers_config(CLIP_L)),),
    parity=(Parity("eos_at_different_positions", CLIP_BOUND, _clip_eos_at_different_positions),))  # float32 rounding only


# --------------------------------------------------------------------------------------------------
# T5 v1.1 encoder
def _t5_reference():
  from transformers import T5Config, T5EncoderModel
  return T5EncoderModel(T5Config(**T5_XXL))


def _t5_padded_batch(reference, ours):
  lengths = [LENGTH, 12, 30]
  ids, mask = padded_batch(lengths)
  parts = tuple(np.s_[row, :n] for row, n in enumerate(lengths))  # the valid tokens of each row
  return [Output("hidden", ours(ids, mask), t5_forward(reference, ids, mask), (3, LENGTH, T5_TINY["d_model"]), parts)]


def _t5_without_mask(reference, ours):
  """What FLUX's pipeline does: no mask, padding attended to."""
  ids, _ = padded_batch([LENGTH, 9])
  return [Output("hidden", ours(ids), t5_forward(reference, ids), (2, LENGTH, T5_TINY["d_model"]))]


T5 = ModelCase(
    name="t5", reference="t5_reference", ours="t5_ours", load=t5.load_t5_encoder, module=t5.T5EncoderModel,
    table=t5.T5_WEIGHTS,
    missing="encoder.block.2.layer.1.DenseReluDense.wi_1.weight",
    # a real name with a real shape: block 0's relative attention bias as if block 1 had one too
    unexpected="encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
    unexpected_like="encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    misshaped="encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", misshaped_axis=0,
    misshaped_shapes="checkpoint (7, 4), model expects (8, 4)",
    full_size=(FullSize(t5.t5_xxl, _t5_reference, _parameter_shapes, n_params=4_762_310_656, n_tensors=219,
                        config=lambda ref: t5.T5Config.from_transformers_config(T5_XXL)),),
    parity=(Parity("padded_batch", T5_BOUND, _t5_padded_batch),  # float32 rounding only
            Parity("without_mask", T5_BOUND, _t5_without_mask)))


# --------------------------------------------------------------------------------------------------
# Qwen2.5-VL
def _qwen_reference(preset):
  def build():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config(preset())))
  return build


def _qwen_hub_shapes(ref) -> dict[str, tuple[int, ...]]:
  return {qv.hub_name(n): tuple(p.shape) for n, p in ref.state_dict().items()}


def _qwen_logits(padding_side):
  def run(reference, ours):
    inputs = qwen_inputs(padding_side)
    valid = inputs["attention_mask"].astype(bool)
    shape = inputs["input_ids"].shape + (qv.tiny().vocab_size,)
    return [Output("logits", ours(**inputs), torch_logits(reference, inputs), shape, (valid,))]
  return run


def _qwen_vision_tower(reference, ours):
  inputs = qwen_inputs("left")
  with torch.no_grad():
    ref = reference.model.visual(torch.from_numpy(inputs["pixel_values"]),
                                 grid_thw=torch.from_numpy(inputs["image_grid_thw"])).pooler_output.numpy()
  v = qv.tiny().vision
  layout = qv.vision_layout(inputs["image_grid_thw"], v)
  shape = (int(inputs["image_grid_thw"].prod(-1).sum()) // v.merge_unit, v.out_hidden_size)
  return [Output("merged patches", ours.visual(inputs["pixel_values"], layout), ref, shape)]


QWEN = ModelCase(
    name="qwen2_5_vl", reference="qwen_tiny_reference", ours="qwen_tiny_ours", load=qv.load_qwen2_5_vl,
    module=qv.Qwen25VL, table=qv.QWEN25VL_WEIGHTS,
    missing="visual.blocks.1.attn.qkv.weight",
    unexpected="model.layers.0.self_attn.bogus.weight", unexpected_like=None,
    misshaped="visual.blocks.1.attn.qkv.weight", misshaped_axis=-1,
    misshaped_shapes="checkpoint (96, 31), model expects (96, 32)",
    full_size=tuple(FullSize(preset, _qwen_reference(preset), _qwen_hub_shapes, n_params=n_params, n_tensors=n_tensors,
                             config=lambda ref: qv.Qwen25VLConfig.from_hf_config(ref.config.to_dict()))
                    for preset, n_params, n_tensors in ((qv.qwen2_5_vl_7b, 8_292_166_656, 729),
                                                        (qv.qwen2_5_vl_32b, 33_448_292_352, 1161))),
    parity=(Parity("left_padding", QWEN_BOUND, _qwen_logits("left")),  # float32 rounding only
            Parity("right_padding", QWEN_BOUND, _qwen_logits("right")),
            Parity("vision_tower", QWEN_BOUND, _qwen_vision_tower)))  # the tower is the first half of the logits' path


# --------------------------------------------------------------------------------------------------
# Qwen-Image transformer (Qwen-Image-Edit-2509)
def _qwen_image_reference(**release):
  from diffusers import QwenImageTransformer2DModel
  return QwenImageTransformer2DModel(**release)  # diffusers' defaults are 2509's released config


def _qwen_image_parity(shapes, t):
  def run(reference, ours):
    inputs = qwen_image_inputs(shapes, t)  # row 2's text padded: masked keys
    n_img = sum(f * h * w for f, h, w in shapes)
    return [Output("sample", ours(**inputs), qwen_image_forward(reference, inputs), (2, n_img, qi.tiny().out_dim))]
  return run


QWEN_IMAGE = ModelCase(
    name="qwen_image", reference="qwen_image_reference", ours="qwen_image_ours", load=qi.load_qwen_image_transformer,
    module=qi.QwenImageTransformer, table=qi.QWEN_IMAGE_WEIGHTS,
    missing="transformer_blocks.1.img_mod.1.weight",
    unexpected="transformer_blocks.1.attn.bogus.weight", unexpected_like=None,
    misshaped="transformer_blocks.1.img_mod.1.weight", misshaped_axis=-1,
    misshaped_shapes="checkpoint (192, 31), model expects (192, 32)",
    # 2511 is 2509 with zero_cond_t: the same parameter count, tensor names and shapes
    full_size=tuple(FullSize(preset, functools.partial(_qwen_image_reference, **release), _state_dict_shapes,
                             n_params=20_430_401_088, n_tensors=1933,
                             config=lambda ref: qi.QwenImageConfig.from_diffusers_config(dict(ref.config)))
                    for preset, release in ((qi.edit_2509, {}), (qi.edit_2511, {"zero_cond_t": True}))),
    # the bounds of both timestep regimes and why they differ: qwen_image_fixtures
    parity=(Parity("one_reference", QWEN_IMAGE_BOUND, _qwen_image_parity(ONE_REFERENCE, QI_EXACT)),
            Parity("two_references", QWEN_IMAGE_BOUND, _qwen_image_parity(TWO_REFERENCES, QI_EXACT)),
            Parity("real_timesteps", QWEN_IMAGE_REAL_BOUND, _qwen_image_parity(TWO_REFERENCES, QI_REAL))))


CASES = (FLUX, AUTOENCODER, CLIP, T5, QWEN, QWEN_IMAGE)


def _cases(items):
  """pytest params `case-item` from (case, item, id) triples."""
  return [pytest.param(case, item, id=f"{case.name}-{name}") for case, item, name in items]


# --------------------------------------------------------------------------------------------------
KINDS = ("missing", "unexpected", "mis-shaped")


@pytest.mark.parametrize("case,kind", _cases((c, k, k) for c in CASES for k in KINDS))
def test_loader_errors_name_the_tensor(request, tmp_path, case, kind):
  folder = request.getfixturevalue(case.reference)[1]
  reader = wio.SafetensorsReader.from_folder(folder)
  tensors = {n: np.array(reader.read(n)) for n in reader.names()}
  if kind == "missing":
    del tensors[case.missing]
    detail = case.missing
  elif kind == "unexpected":
    tensors[case.unexpected] = tensors[case.unexpected_like] if case.unexpected_like else np.zeros((2, 2), np.float32)
    detail = case.unexpected
  else:
    t = tensors[case.misshaped]
    tensors[case.misshaped] = np.take(t, np.arange(t.shape[case.misshaped_axis] - 1), axis=case.misshaped_axis)
    detail = f"{case.misshaped}: {case.misshaped_shapes}"
  (file,) = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
  damaged = str(tmp_path / case.name)
  os.makedirs(damaged)
  shutil.copy(os.path.join(folder, "config.json"), damaged)
  wio.save_safetensors(tensors, os.path.join(damaged, file))
  with pytest.raises(wio.CheckpointError) as e:
    case.load(damaged)
  headline, *problems = str(e.value).splitlines()
  assert damaged in headline
  assert problems == [f"  {kind} (1): {detail}"]  # that tensor, and nothing else


@pytest.mark.parametrize("case,size", _cases((c, s, s.id) for c in CASES for s in c.full_size))
def test_full_size_without_memory(case, size):
  with torch.device("meta"):
    ref = size.reference()
  ref_shapes = size.names(ref)
  assert len(ref_shapes) == size.n_tensors
  cfg = size.preset()
  assert size.config(ref) == cfg
  abstract = nnx.eval_shape(lambda: case.module(cfg, rngs=nnx.Rngs(0)))
  assert not jax.tree.leaves(nnx.state(abstract, nnx.LoRAParam))  # no adapters unless asked for
  state = nnx.state(abstract)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state))
  assert n_params == size.n_params == sum(math.prod(s) for s in ref_shapes.values())
  assert {k: v[0] for k, v in wio.reference_shapes(state, case.table).items()} == ref_shapes
  for path, var in nnx.to_flat_state(state):  # every parameter is shardable by name
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var.get_value().ndim, path
    shd.logical_to_spec(axes)


@pytest.mark.parametrize("case,parity", _cases((c, p, p.id) for c in CASES for p in c.parity))
def test_parity(request, case, parity):
  check_parity(case, parity, request.getfixturevalue(case.reference)[0], request.getfixturevalue(case.ours))


def check_parity(case, parity, reference, ours, label: str = "") -> None:
  for out in parity.run(reference, ours):
    got = np.asarray(out.ours)
    assert got.shape == out.ref.shape == out.shape, out.name
    for part in out.parts:
      err = max_rel_err(got[part], out.ref[part])
      print(f"{case.name} {parity.id} parity{label}, {out.name}: max rel err {err:.2e} (bound {parity.bound:.1e})")
      assert err <= parity.bound, out.name


# The models whose attention the splash kernel can take (T5's relative-position bias keeps XLA: test_attention.py).
SPLASH = ("flux", "autoencoder", "clip", "qwen2_5_vl", "qwen_image")


@pytest.mark.parametrize("case,parity", _cases((c, c.parity[0], c.parity[0].id) for c in CASES if c.name in SPLASH))
def test_parity_through_the_splash_kernel(request, case, parity):
  """The first parity of each model again with every attention through the TPU's splash kernel (Pallas' interpret
  mode here): the kernel sums the softmax block by block (online rescaling), a reordering of the same float32 sums
  that the bound already covers."""
  reference, folder = request.getfixturevalue(case.reference)
  check_parity(case, parity, reference, case.load(folder, attention_impl="splash"), " (splash)")
