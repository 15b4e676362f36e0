"""Checkpoint I/O on damaged input: every fault is one CheckpointError naming the file and the tensor or field."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from test_autoencoder import diffusers_config
from test_clip import CLIP_L
from test_t5 import T5_XXL

from editr1_jax import weights as wio
from editr1_jax.models import autoencoder as ae
from editr1_jax.models import clip, flux, t5
from editr1_jax.models import qwen2_5_vl as qv


def _split(raw: bytes) -> tuple[dict, bytes]:
  (n,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header, data: bytes) -> bytes:
  raw = json.dumps(header).encode()
  return struct.pack("<Q", len(raw)) + raw + data


def _edit_header(edit):
  def damage(raw):
    header, data = _split(raw)
    edit(header)
    return _join(header, data)
  return damage


# name -> (damage of the file's bytes, what the message must say). "b" is stored before "w", the last tensor.
DAMAGES = {
    "truncated": (lambda raw: raw[:-8], "'w'"),
    "header_longer_than_file": (lambda raw: struct.pack("<Q", len(raw)) + raw[8:], "header length"),
    "garbage": (lambda raw: b"\xff" * 64, "header length"),
    "offsets_past_end": (_edit_header(lambda h: h["w"].update(data_offsets=[64, 64 + 4 * 512 + 4])), "'w'"),
    "offsets_disagree_with_shape": (_edit_header(lambda h: h["w"].update(shape=[32, 17])), "'w'"),
    "overlapping": (_edit_header(lambda h: h["b"].update(data_offsets=[60, 124])), "overlap"),
    "negative_offset": (_edit_header(lambda h: h["b"].update(data_offsets=[-4, 60])), "'b'"),
    "not_an_object": (lambda raw: _join([1, 2], _split(raw)[1]), "not a JSON object"),
    "entry_without_dtype": (_edit_header(lambda h: h["w"].pop("dtype")), "'w'"),
    "shape_not_a_list": (_edit_header(lambda h: h["w"].update(shape="32x16")), "'w'"),
    "metadata_not_strings": (_edit_header(lambda h: h.update(__metadata__={"r": 4})), "__metadata__"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_safetensors_is_one_error_at_open(tmp_path, damage):
  path = str(tmp_path / "model.safetensors")
  wio.save_safetensors({"w": np.ones((32, 16), np.float32), "b": np.ones((16,), np.float32)}, path)
  edit, says = DAMAGES[damage]
  with open(path, "rb") as f:
    raw = edit(f.read())
  with open(path, "wb") as f:
    f.write(raw)
  with pytest.raises(wio.CheckpointError) as e:
    wio.SafetensorsReader([path])
  assert path in str(e.value) and says in str(e.value)


INDEXES = {
    "bad_json": ('{"weight_map": ', "not valid JSON"),
    "empty_file": ("", "not valid JSON"),
    "not_an_object": ("[]", "not a JSON object"),
    "no_weight_map": ("{}", "'weight_map'"),
    "weight_map_a_list": ('{"weight_map": ["w"]}', "'weight_map'"),
    "weight_map_values_not_str": ('{"weight_map": {"w": 3}}', "'weight_map'"),
    "weight_map_empty": ('{"weight_map": {}}', "'weight_map'"),
    "shard_absent": ('{"weight_map": {"w": "model-00002.safetensors"}}', "model-00002.safetensors"),
}


@pytest.mark.parametrize("kind", sorted(INDEXES))
def test_damaged_index_json(tmp_path, kind):
  wio.save_safetensors({"w": np.ones((2,), np.float32)}, str(tmp_path / "model-00001.safetensors"))
  text, says = INDEXES[kind]
  index = tmp_path / "model.safetensors.index.json"
  index.write_text(text)
  with pytest.raises(wio.CheckpointError) as e:
    wio.SafetensorsReader.from_folder(str(tmp_path))
  assert str(index) in str(e.value) and says in str(e.value)


# --------------------------------------------------------------------------------------------------
# Every model's config parser, given a field of the wrong type.
PARSERS = {
    "flux": (flux.FluxConfig.from_diffusers_config, flux.tiny().to_diffusers_config()),
    "autoencoder": (ae.AutoencoderConfig.from_diffusers_config, diffusers_config(ae.tiny())),
    "clip": (clip.CLIPTextConfig.from_transformers_config, CLIP_L),
    "t5": (t5.T5Config.from_transformers_config, T5_XXL),
    "qwen2_5_vl": (qv.Qwen25VLConfig.from_hf_config, {}),
}
WRONG = [
    ("flux", "num_layers", "1", "must be int"),
    ("flux", "num_layers", True, "must be int"),
    ("flux", "guidance_embeds", 1, "must be bool"),
    ("flux", "axes_dims_rope", "4,6,6", "must be a list of int"),
    ("flux", "out_channels", 4.0, "must be int or null"),
    ("autoencoder", "shift_factor", "0.1", "must be float"),
    ("autoencoder", "block_out_channels", 8, "must be a list of int"),
    ("clip", "num_hidden_layers", 12.0, "must be int"),
    ("t5", "layer_norm_epsilon", "1e-6", "must be float"),
    ("qwen2_5_vl", "vision_config", {"depth": "3"}, "'vision_config.depth' must be int"),
    ("qwen2_5_vl", "rope_scaling", {"mrope_section": 16}, "must be a list of int"),
    ("qwen2_5_vl", "vision_config", [1], "'vision_config' must be an object"),
]


@pytest.mark.parametrize("model,field,value,says", WRONG)
def test_config_field_of_wrong_type(model, field, value, says):
  parse, config = PARSERS[model]
  with pytest.raises(wio.CheckpointError) as e:
    parse(dict(config, **{field: value}), source="x/config.json")
  assert str(e.value).startswith("x/config.json: ") and f"'{field}" in str(e.value) and says in str(e.value)


def test_config_ints_are_floats_and_lists_tuples():
  cfg = ae.AutoencoderConfig.from_diffusers_config(dict(diffusers_config(ae.tiny()), shift_factor=0))
  assert type(cfg.shift_factor) is float and cfg.block_out_channels == ae.tiny().block_out_channels


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_tensors():
  model = flux.FluxTransformer(flux.tiny(), rngs=nnx.Rngs(0))
  return wio.to_reference(nnx.state(model), flux.FLUX_WEIGHTS)


def _flux_folder(folder, tensors, config: bytes = json.dumps(flux.tiny().to_diffusers_config()).encode()) -> str:
  os.makedirs(folder)
  wio.save_safetensors(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "wb") as f:
    f.write(config)
  return str(folder)


@pytest.mark.parametrize("config,says", [
    (json.dumps(dict(flux.tiny().to_diffusers_config(), num_layers="1")).encode(), "'num_layers' must be int, got '1'"),
    (b'\xff{"num_layers": 1}', "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
])
def test_loader_names_the_config_file(flux_tensors, tmp_path, config, says):
  folder = _flux_folder(tmp_path / "transformer", flux_tensors, config)
  with pytest.raises(wio.CheckpointError) as e:
    flux.load_flux_transformer(folder)
  assert os.path.join(folder, "config.json") in str(e.value) and says in str(e.value)


def test_only_float_tensors_fill_float_parameters(flux_tensors, tmp_path):
  name = "transformer_blocks.1.attn.to_q.weight"
  for dtype in (np.int32, np.bool_):
    tensors = dict(flux_tensors, **{name: flux_tensors[name].astype(dtype)})
    folder = _flux_folder(tmp_path / np.dtype(dtype).name, tensors)
    with pytest.raises(wio.CheckpointError) as e:
      flux.load_flux_transformer(folder)
    assert folder in str(e.value) and f"not floating point (1): {name}: {np.dtype(dtype)}" in str(e.value)
  for dtype in (np.float16, ml_dtypes.bfloat16, np.float64):
    folder = _flux_folder(tmp_path / np.dtype(dtype).name, {k: v.astype(dtype) for k, v in flux_tensors.items()})
    np.testing.assert_array_equal(np.asarray(flux.load_flux_transformer(folder).proj_out.kernel[...]),
                                  flux_tensors["proj_out.weight"].astype(dtype).astype(np.float32).T)
