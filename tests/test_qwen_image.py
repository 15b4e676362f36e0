"""Qwen-Image transformer: rotary positions vs diffusers' tables, the positions path, LoRA (vs peft), input and
config errors, sharding, remat (loader errors, full size and parity with diffusers: test_models_contract.py)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import max_rel_err
from qwen_image_fixtures import EXACT, LORA, QWEN_IMAGE_BOUND, REAL, TINY, TWO_REFERENCES, make_inputs, torch_forward

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.layers import AdapterRows, LoraSpec
from editr1_jax.models import flux
from editr1_jax.models import qwen_image as qi


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes", [[(1, 3, 4)], TWO_REFERENCES, [(1, 5, 2), (2, 3, 3)]])
def test_rope_positions_give_the_reference_tables(shapes):
  """Our float32 cos/sin from positions equal diffusers' complex lookup tables (odd/even sizes, two frames)."""
  from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
  text = 6
  rope = QwenEmbedRope(theta=10000, axes_dim=TINY["axes_dims_rope"], scale_rope=True)
  img_freqs, txt_freqs = rope([list(shapes)], max_txt_seq_len=text, device=torch.device("cpu"))
  img_pos, txt_pos = qi.rope_positions([list(shapes)], text)
  assert img_pos.shape == (sum(math.prod(s) for s in shapes), 3) and txt_pos.shape == (text, 3)
  cos, sin = flux.rope_tables(jnp.asarray(np.concatenate([txt_pos, img_pos])), TINY["axes_dims_rope"], 10000.0)
  ref = torch.cat([txt_freqs, img_freqs]).numpy()  # (L, head_dim / 2) complex: pairs are interleaved in ours
  # |angle| <= ~10 rad: float32 cos/sin of the same float32 angle, a frequency rounded apart by 1 ulp at most
  np.testing.assert_allclose(np.asarray(cos)[:, ::2], ref.real, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sin)[:, ::2], ref.imag, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(cos)[:, ::2], np.asarray(cos)[:, 1::2])


def test_positions_path_equals_img_shapes_path(qwen_image_ours):
  inputs = make_inputs(TWO_REFERENCES, EXACT)
  out = np.asarray(qwen_image_ours(**inputs))
  positions = qi.rope_positions(inputs["img_shapes"], inputs["encoder_hidden_states"].shape[1])
  arrays = {k: v for k, v in inputs.items() if k != "img_shapes"}
  np.testing.assert_array_equal(np.asarray(qwen_image_ours(**arrays, positions=positions)), out)
  # per-row positions (B, L, 3) broadcast differently: float32 rounding at most
  per_row = tuple(np.stack([p, p]) for p in positions)
  assert max_rel_err(qwen_image_ours(**arrays, positions=per_row), out) <= QWEN_IMAGE_BOUND
  # and inside jit, where img_shapes could not go: the positions are arrays of the pytree
  jitted = jax.jit(lambda m, x, p: m(**x, positions=p))(qwen_image_ours, arrays, positions)
  assert max_rel_err(jitted, out) <= QWEN_IMAGE_BOUND


def test_pipeline_folder_layout(qwen_image_reference):
  model = qi.load_qwen_image_transformer(os.path.dirname(qwen_image_reference[1]))
  assert model.cfg == qi.tiny()
  assert qi.QwenImageConfig.from_diffusers_config(model.cfg.to_diffusers_config()) == model.cfg
  saved = wio.read_config(qwen_image_reference[1])
  assert {k: v for k, v in saved.items() if not k.startswith("_")} == {
      k: v for k, v in model.cfg.to_diffusers_config().items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------------
def test_bad_inputs_are_refused_by_name(qwen_image_ours):
  inputs = make_inputs(TWO_REFERENCES, EXACT)
  cases = [
      (dict(img_shapes=[TWO_REFERENCES, TWO_REFERENCES[:2]]), r"img_shapes: every row must have the same images"),
      (dict(img_shapes=[TWO_REFERENCES]), r"img_shapes has 1 rows, the batch has 2"),
      (dict(img_shapes=[TWO_REFERENCES[:2]] * 2), r"img_shapes: the images hold 22 tokens, hidden_states has 34"),
      (dict(img_shapes=[[(1, 0, 4)]] * 2), r"img_shapes\[0\]\[0\] must be a \(frame, height, width\) triple"),
      (dict(encoder_hidden_states_mask=np.ones((2, 5))), r"encoder_hidden_states_mask must be \(2, 7\)"),
      (dict(encoder_hidden_states=np.zeros((2, 7, 23), np.float32)), r"encoder_hidden_states must be \(2, text"),
      (dict(hidden_states=np.zeros((2, 34, 15), np.float32)), r"hidden_states must be \(batch, image tokens, 16\)"),
      (dict(timestep=np.zeros(3, np.float32)), r"timestep must be a scalar or \(2,\)"),
      (dict(positions=qi.rope_positions(inputs["img_shapes"], 7)), r"exactly one of img_shapes and positions"),
      (dict(img_shapes=None, positions=qi.rope_positions(inputs["img_shapes"], 6)),
       r"positions: text positions must be \(7, 3\) or \(2, 7, 3\)"),
  ]
  for change, message in cases:
    with pytest.raises(ValueError, match=message):
      qwen_image_ours(**(inputs | change))


@pytest.mark.parametrize("field", ["guidance_embeds", "use_additional_t_cond", "use_layer3d_rope"])
def test_unported_config_features_are_refused(field):
  with pytest.raises(ValueError, match=f"^{field}: true is not supported"):
    qi.QwenImageConfig.from_diffusers_config({**TINY, field: True})


# --------------------------------------------------------------------------------------------------
def test_lora_targets_match_peft(qwen_image_lora_reference):
  peft_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in qwen_image_lora_reference[0].named_parameters()
                  if ".lora_A." in n}
  abstract = nnx.eval_shape(lambda: qi.QwenImageTransformer(qi.tiny(lora=LORA), rngs=nnx.Rngs(0)))
  _, adapters, _ = qi.split_params(abstract)
  ours_modules = {wio.reference_name(p, qi.QWEN_IMAGE_LORA_WEIGHTS)[0].rsplit(".lora_", 1)[0]
                  for p, _, _ in wio.tensor_entries(adapters)}
  assert ours_modules == peft_modules and len(ours_modules) == 8 * TINY["num_layers"]


def test_lora_parity_and_per_row_adapters(qwen_image_reference, qwen_image_lora_reference, qwen_image_ours):
  model = qi.load_qwen_image_transformer(qwen_image_reference[1], lora=LORA, lora_weights=qwen_image_lora_reference[1])
  inputs = make_inputs(TWO_REFERENCES, EXACT)
  ref = torch_forward(qwen_image_lora_reference[0], inputs)
  out = np.asarray(model(**inputs))
  assert max_rel_err(out, ref) <= QWEN_IMAGE_BOUND  # rank-4 adapters: no reduction longer than K = 256
  assert max_rel_err(torch_forward(qwen_image_reference[0], inputs), ref) > 1e-3  # the adapter changes the output
  # per row: row 0 with the adapter, row 1 without (scale 0) equals the base model's row 1
  rows = np.asarray(model(**inputs, adapters=AdapterRows(jnp.array([0, 0]), jnp.array([1.0, 0.0]))))
  base = np.asarray(qwen_image_ours(**inputs))
  np.testing.assert_allclose(rows[0], out[0], rtol=0, atol=QWEN_IMAGE_BOUND * np.abs(out).max())
  np.testing.assert_allclose(rows[1], base[1], rtol=0, atol=QWEN_IMAGE_BOUND * np.abs(base).max())


def test_fresh_adapter_is_identity(qwen_image_reference, qwen_image_ours):
  model = qi.load_qwen_image_transformer(qwen_image_reference[1], lora=LORA, seed=3)
  inputs = make_inputs(TWO_REFERENCES, EXACT)
  np.testing.assert_array_equal(np.asarray(model(**inputs)), np.asarray(qwen_image_ours(**inputs)))


def test_edit_2509_lora_count():
  """The 60 blocks are built by one code path: one full-width block's adapters times 60 (tracing the abstract model
  with adapters in all 60 takes over a minute), and which layers of the full model take one, by name."""
  spec = LoraSpec(rank=32, alpha=64.0, targets=qi.DEFAULT_LORA_TARGETS)
  cfg = qi.edit_2509(lora=spec).replace(num_layers=1)
  _, adapters, _ = qi.split_params(nnx.eval_shape(lambda: qi.QwenImageTransformer(cfg, rngs=nnx.Rngs(0))))
  flat = nnx.to_flat_state(adapters)
  assert {p[0] for p, _ in flat} == {"transformer_blocks"} and len(flat) == 8 * 2
  per_block = sum(math.prod(v.get_value().shape) for _, v in flat)
  adapted = [name for name in qi._edit_2509_adapter_layers() if spec.matches(name)]
  assert len(adapted) == 60 * 8 and {n.split(".")[1] for n in adapted} == {str(i) for i in range(60)}
  # 60 blocks x 8 projections 3072 -> 3072 at rank 32
  assert 60 * per_block == 94_371_840 == 60 * 8 * (3072 + 3072) * 32


def test_lora_target_matching_no_layer_is_an_error():
  with pytest.raises(ValueError) as e:
    qi.check_lora_targets(("to_q", "proj_mlp"), "config.lora.targets")
  assert str(e.value).startswith("config.lora.targets: target 'proj_mlp' matches no layer of the Qwen-Image "
                                 "transformer; closest: ")
  assert "transformer_blocks.<0-59>.* (14 kinds)" in str(e.value)
  qi.check_lora_targets(qi.DEFAULT_LORA_TARGETS + ("transformer_blocks.59.img_mlp.net.2", "txt_mod.1"), "x")
  with pytest.raises(ValueError, match="'transformer_blocks.60.attn.to_q' matches no layer"):
    qi.check_lora_targets(("transformer_blocks.60.attn.to_q",), "x")


def test_lora_file_without_lora_spec_is_an_error(qwen_image_reference, qwen_image_lora_reference):
  with pytest.raises(ValueError, match="LoraSpec"):
    qi.load_qwen_image_transformer(qwen_image_reference[1], lora_weights=qwen_image_lora_reference[1])


# --------------------------------------------------------------------------------------------------
def test_sharded_jit_forward_equals_single_device(qwen_image_reference, qwen_image_ours):
  assert len(jax.devices()) >= 8, "conftest sets 8 host devices"
  mesh = shd.make_mesh((2, 2, 2))
  model = qi.load_qwen_image_transformer(qwen_image_reference[1], mesh=mesh, lora=LORA)
  blocks = model.transformer_blocks.stacked  # stacked for the scan: the block axis is never split
  kernel = blocks.attn.to_q.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert {s.data.shape[1:] for s in kernel.addressable_shards} == {(16, 16)}
  assert blocks.img_mlp.fc2.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  inputs = make_inputs(TWO_REFERENCES, EXACT, batch=4)
  positions = qi.rope_positions(inputs.pop("img_shapes"), inputs["encoder_hidden_states"].shape[1])
  with shd.use_mesh(mesh):
    out = jax.jit(lambda m, x, p: m(**x, positions=p))(model, inputs, positions)
  # sharded reductions sum in another order: equal up to float32 rounding
  assert max_rel_err(out, qwen_image_ours(**inputs, positions=positions)) <= QWEN_IMAGE_BOUND


def test_remat_policies_keep_values_and_gradients(qwen_image_reference, qwen_image_lora_reference):
  inputs = make_inputs(TWO_REFERENCES, EXACT)

  def grads(remat):
    model = qi.load_qwen_image_transformer(qwen_image_reference[1], lora=LORA,
                                           lora_weights=qwen_image_lora_reference[1], remat=remat)
    graphdef, adapters, base = qi.split_params(model)

    def loss(a):
      return jnp.mean(jnp.square(nnx.merge(graphdef, a, base)(**inputs)))

    return jax.jit(jax.value_and_grad(loss))(adapters)

  v0, g0 = grads("none")
  for remat in ("full", "flux"):
    v, g = grads(remat)
    assert abs(float(v) - float(v0)) <= QWEN_IMAGE_BOUND * abs(float(v0))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
      # the last block's text-only adapters (add_q_proj, to_add_out) do not reach the output: gradient 0 both ways
      assert max_rel_err(a, b) <= QWEN_IMAGE_BOUND if np.any(b) else not np.any(a)


def test_bf16_forward_close_to_float32(qwen_image_reference, qwen_image_ours):
  """bfloat16 compute and storage against the float32 model: every stored activation rounds to 8 bits; a value
  passes ~32 normalised layers (2 blocks: modulation, attention, feed-forward per stream; embedders, norm_out):
  helpers.bfloat16_bound(32). The timestep sinusoids and rope stay float32 either way."""
  from helpers import bfloat16_bound
  model = qi.load_qwen_image_transformer(qwen_image_reference[1], dtype="bfloat16")
  inputs = make_inputs(TWO_REFERENCES, REAL)
  out = model(**inputs)
  assert out.dtype == jnp.bfloat16
  ours = np.asarray(out.astype(jnp.float32))
  assert np.isfinite(ours).all()
  assert max_rel_err(ours, np.asarray(qwen_image_ours(**inputs))) <= bfloat16_bound(32)  # measured 6.8e-3 (3.3e-2)
