"""Qwen2.5-VL: host structure (windows, M-RoPE index), logits_at, jit / sharding / remat, dtypes, tied embeddings,
name schemes, config and input errors (loader errors, full size and parity with transformers: test_models_contract.py)."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import bfloat16_bound, float32_bound, max_rel_err
from qwen_fixtures import QWEN_BOUND
from qwen_fixtures import save_reference as _save_reference

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.models import qwen2_5_vl as qv

TINY = qv.tiny()
PAD = 7  # padding token id (any non-image id)
# Image grids (t, h, w) in 14-pixel patches; windows are 2x2 merged patches (4x4 patches). Row 0: a 3x5 and a
# 2x3 merged grid (partial windows on both axes / on one axis); row 1: 4x2 (exact windows) and 3x3.
GRIDS = [[(1, 6, 10), (1, 4, 6)], [(1, 8, 4), (1, 6, 6)]]
TEXT_RUNS = [(3, 2, 4), (5, 1, 2)]  # text tokens before, between and after the two images of each row


def make_inputs(padding_side: str, seed: int = 0):
  """Two rows of different lengths, two images of different sizes each, padded on `padding_side`."""
  rng = np.random.default_rng(seed)
  m2 = TINY.vision.merge_unit
  rows = []
  for grids, (a, b, c) in zip(GRIDS, TEXT_RUNS):
    text = lambda n: list(rng.integers(0, TINY.vision_start_token_id, n))
    image = lambda g: [TINY.vision_start_token_id] + [TINY.image_token_id] * (int(np.prod(g)) // m2) + [
        TINY.vision_end_token_id]
    rows.append(text(a) + image(grids[0]) + text(b) + image(grids[1]) + text(c))
  length = max(map(len, rows))
  ids = np.full((len(rows), length), PAD, np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for i, row in enumerate(rows):
    sl = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
    ids[i, sl], mask[i, sl] = row, 1
  grid_thw = np.array([g for grids in GRIDS for g in grids], np.int64)
  pixels = rng.standard_normal((int(grid_thw.prod(-1).sum()), TINY.vision.patch_dim)).astype(np.float32)
  return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid_thw)


def torch_logits(model, inputs):
  t = {k: torch.from_numpy(v) for k, v in inputs.items()}
  t["mm_token_type_ids"] = (t["input_ids"] == model.config.image_token_id).long()
  with torch.no_grad():
    return model(**t).logits.numpy()


# The tiny reference and its load are session fixtures (qwen_fixtures), shared with test_models_contract.py.
@pytest.fixture(scope="module")
def reference(qwen_tiny_reference):
  return qwen_tiny_reference


@pytest.fixture(scope="module")
def ours(qwen_tiny_ours):
  return qwen_tiny_ours


# --------------------------------------------------------------------------------------------------
def test_config_round_trip(reference):
  assert qv.Qwen25VLConfig.from_hf_config(wio.read_config(reference[1])) == TINY


def test_window_structure_equals_transformers():
  from transformers.vision_utils import get_vision_window_index
  grids = np.array([g for grids in GRIDS for g in grids] + [(2, 4, 4)])  # plus two frames of one image
  v = TINY.vision
  ref_index, ref_cu = get_vision_window_index(torch.from_numpy(grids), v.spatial_merge_size, v.window_size,
                                              v.patch_size)
  layout = qv.vision_layout(grids, v)
  np.testing.assert_array_equal(layout.window_index, ref_index.numpy())
  lengths = layout.windows.valid.sum(-1)
  np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(lengths)]), ref_cu.numpy())
  assert (lengths < v.window_units ** 2 * v.merge_unit).any()  # partial windows are present
  np.testing.assert_array_equal(layout.frames.valid.sum(-1), [60, 24, 32, 36, 16, 16])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_rope_index_equals_transformers(reference, padding_side):
  inputs = make_inputs(padding_side)
  t = {k: torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask", "image_grid_thw")}
  ref_pos, ref_delta = reference[0].model.get_rope_index(
      t["input_ids"], mm_token_type_ids=(t["input_ids"] == TINY.image_token_id).int(),
      image_grid_thw=t["image_grid_thw"], attention_mask=t["attention_mask"])
  pos, delta = qv.get_rope_index(inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"], TINY)
  np.testing.assert_array_equal(pos, ref_pos.numpy())
  np.testing.assert_array_equal(delta, ref_delta.numpy())


def test_logits_at_equals_gathered_logits(ours):
  inputs = make_inputs("left")
  full = np.asarray(ours(**inputs))
  positions = np.array([[33, 5, 20], [33, 10, 6]])
  picked = np.asarray(ours.logits_at(**inputs, positions=positions))
  # the same hidden states; only the head's dot products (K = hidden_size) on 3 rows vs all rows may sum in another
  # order: one reduction, condition 2 as its sum |w h| reaches 1.9 max |logit| here
  np.testing.assert_allclose(picked, np.take_along_axis(full, positions[..., None], axis=1), rtol=0,
                             atol=float32_bound(TINY.hidden_size, condition=2) * np.abs(full).max())


def test_jit_sharded_remat_equal_eager(reference, ours):
  """The host/jit split: prepare_batch on the host, one jitted prefill, on a (2, 2, 2) mesh, under remat."""
  inputs = make_inputs("left")
  positions = np.array([[33], [30]])
  eager = np.asarray(ours.logits_at(**inputs, positions=positions))
  mesh = shd.make_mesh((2, 2, 2))
  model = qv.load_qwen2_5_vl(reference[1], mesh=mesh, remat="full")
  batch = qv.prepare_batch(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                           inputs["image_grid_thw"], model.cfg)

  @nnx.jit
  def step(model, batch, positions):
    with shd.use_mesh(mesh):
      return model.logits_at_batch(batch, positions)

  out = step(model, batch, positions)
  np.testing.assert_allclose(np.asarray(out), eager, rtol=0, atol=QWEN_BOUND * np.abs(eager).max())  # rounding only
  embedding = model.language_model.embed_tokens.embedding[...]
  assert embedding.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_bf16_close_to_float32(reference, ours):
  inputs = make_inputs("left")
  positions = np.array([[33], [30]])
  model = qv.load_qwen2_5_vl(reference[1], dtype="bfloat16")
  out = np.asarray(model.logits_at(**inputs, positions=positions))
  assert out.dtype == np.float32 and np.isfinite(out).all()
  # measured 1.3e-2; 51 layers deep (see bfloat16_bound)
  assert max_rel_err(out, np.asarray(ours.logits_at(**inputs, positions=positions))) <= bfloat16_bound(51)


def test_tied_embeddings_text_only(tmp_path):
  cfg = TINY.replace(tie_word_embeddings=True)
  reference = _save_reference(cfg, str(tmp_path / "tied"))
  model = qv.load_qwen2_5_vl(str(tmp_path / "tied"))
  assert model.lm_head is None
  ids = np.random.default_rng(1).integers(0, TINY.vision_start_token_id, (2, 9))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  with torch.no_grad():
    ref = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  out = np.asarray(model(ids, mask, None, None))
  assert max_rel_err(out[mask.astype(bool)], ref[mask.astype(bool)]) <= QWEN_BOUND  # text only: a shorter path


# --------------------------------------------------------------------------------------------------
def _in_memory_name(name: str) -> str:
  """Hub/checkpoint names -> transformers 5's in-memory names (`model.visual.*`, `model.language_model.*`)."""
  if name.startswith("visual."):
    return "model." + name
  if name.startswith("model."):
    return "model.language_model." + name[len("model."):]
  return name


def _rewrite(folder, dst, edit, rename=lambda n: n, shards=1):
  reader = wio.SafetensorsReader.from_folder(folder)
  tensors = {rename(n): np.array(reader.read(n)) for n in reader.names()}
  edit(tensors)
  os.makedirs(dst)
  names = sorted(tensors)
  files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards] for i in range(shards)}
  for file, part in files.items():
    wio.save_safetensors({n: tensors[n] for n in part}, os.path.join(dst, file))
  if shards > 1:
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
      json.dump({"weight_map": {n: file for file, part in files.items() for n in part}}, f)
  with open(os.path.join(folder, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  return dst


def test_in_memory_names_in_sharded_folder(reference, ours, tmp_path):
  """save_pretrained writes hub names (checked here); a file with the in-memory names loads the same."""
  saved = wio.SafetensorsReader.from_folder(reference[1]).names()
  assert "visual.blocks.0.attn.qkv.weight" in saved and "model.layers.0.self_attn.q_proj.bias" in saved
  folder = _rewrite(reference[1], str(tmp_path / "t5"), lambda t: None, rename=_in_memory_name, shards=2)
  assert set(wio.SafetensorsReader.from_folder(folder).names()) == set(reference[0].state_dict())
  model = qv.load_qwen2_5_vl(folder)
  inputs = make_inputs("left")
  np.testing.assert_array_equal(np.asarray(model(**inputs)), np.asarray(ours(**inputs)))


def test_hub_config_with_flat_text_fields():
  """Hub configs keep the text fields at the top level, `rope_scaling` of type mrope and `in_chans`."""
  hub = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_act": "silu", "hidden_size": 3584,
         "image_token_id": 151655, "intermediate_size": 18944, "max_position_embeddings": 128000,
         "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
         "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
         "use_sliding_window": False, "vision_end_token_id": 151653, "vision_start_token_id": 151652,
         "vocab_size": 152064, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
         "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                           "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                           "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                           "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                           "temporal_patch_size": 2}}
  assert qv.Qwen25VLConfig.from_hf_config(hub) == qv.qwen2_5_vl_7b()
  with pytest.raises(ValueError, match="use_sliding_window"):
    qv.Qwen25VLConfig.from_hf_config(dict(hub, use_sliding_window=True))


def test_input_errors(ours):
  inputs = make_inputs("left")
  ids = inputs["input_ids"]
  with pytest.raises(ValueError, match="more images"):
    ours(**dict(inputs, input_ids=np.where(ids == TINY.image_token_id, PAD, ids)))
  short = ids.copy()
  short[0, np.flatnonzero(ids[0] == TINY.image_token_id)[0]] = PAD
  with pytest.raises(ValueError, match="shorter than image grid"):
    ours(**dict(inputs, input_ids=short))
  with pytest.raises(ValueError, match="pixel_values shape"):
    ours(**dict(inputs, pixel_values=inputs["pixel_values"][:-4]))
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    ours(**dict(inputs, image_grid_thw=inputs["image_grid_thw"] + [0, 1, 0]))
  with pytest.raises(ValueError, match="vocab_size"):
    ours(**dict(inputs, input_ids=np.where(ids == PAD, TINY.vocab_size, ids)))
  with pytest.raises(ValueError, match="positions must lie"):
    ours.logits_at(**inputs, positions=np.array([[ids.shape[1]], [0]]))
