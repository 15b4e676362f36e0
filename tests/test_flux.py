"""FLUX transformer: LoRA (vs peft), shared ids, folder layouts, bf16, sharding (loader errors, full size and parity
with diffusers: test_models_contract.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flux_fixtures import EXACT, FLUX_BOUND, LORA, REAL, TINY, make_inputs, torch_forward
from helpers import bfloat16_bound, max_rel_err

from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.layers import AdapterRows, LoraSpec, StackedBlocks
from editr1_jax.models import flux


def test_batched_ids_equal_shared_ids(ours):
  inputs = make_inputs(**EXACT)
  shared = ours(**inputs)
  batched = dict(inputs, img_ids=np.stack([inputs["img_ids"]] * 2), txt_ids=np.stack([inputs["txt_ids"]] * 2))
  # the same forward with ids shared or per row: float32 rounding at most (measured 0)
  np.testing.assert_allclose(np.asarray(ours(**batched)), np.asarray(shared), rtol=0,
                             atol=FLUX_BOUND * np.abs(np.asarray(shared)).max())


def test_pipeline_folder_layout(reference):
  pipeline_root = os.path.dirname(reference[1])
  model = flux.load_flux_transformer(pipeline_root)
  assert model.cfg.num_layers == TINY["num_layers"]


# --------------------------------------------------------------------------------------------------
def test_lora_targets_match_peft(lora_reference, ours):
  peft_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in lora_reference[0].named_parameters() if ".lora_A." in n}
  abstract = nnx.eval_shape(lambda: flux.FluxTransformer(ours.cfg.replace(lora=LORA), rngs=nnx.Rngs(0)))
  _, adapters, _ = flux.split_params(abstract)
  ours_modules = {wio.reference_name(p, flux.FLUX_LORA_WEIGHTS)[0].rsplit(".lora_", 1)[0]
                  for p, _, _ in wio.tensor_entries(adapters)}
  assert ours_modules == peft_modules
  # single-stream blocks have to_q/k/v adapted, no to_out
  assert "single_transformer_blocks.0.attn.to_q" in ours_modules
  assert not any(m.startswith("single_transformer_blocks.0.attn.to_out") for m in ours_modules)


def test_lora_parity(reference, lora_reference):
  model = flux.load_flux_transformer(reference[1], lora=LORA, lora_weights=lora_reference[1])
  inputs = make_inputs(**EXACT)
  ref = torch_forward(lora_reference[0], inputs)
  assert max_rel_err(ours_out := np.asarray(model(**inputs)), ref) <= FLUX_BOUND  # rank-4 adapters: K <= 256 still
  # and the adapter really changes the output
  assert max_rel_err(torch_forward(reference[0], inputs), ref) > 1e-3
  del ours_out


def test_fresh_adapter_is_identity(reference, ours):
  model = flux.load_flux_transformer(reference[1], lora=LORA, seed=3)
  _, adapters, _ = flux.split_params(model)
  b = [v.get_value() for p, v in nnx.to_flat_state(adapters) if p[-1] == "lora_b"]
  assert b and all(not np.asarray(x).any() for x in b)  # peft's gaussian init: B = 0, so A B = 0 exactly
  inputs = make_inputs(**EXACT)
  # the same sums, compiled into other fusions (the scan compiles each block whole): float32 rounding only
  assert max_rel_err(model(**inputs), ours(**inputs)) <= FLUX_BOUND


def test_per_row_adapters_equal_separate_calls(reference, lora_reference):
  model = flux.load_flux_transformer(reference[1], lora=LORA, lora_weights=lora_reference[1])
  graphdef, adapters, base = flux.split_params(model)
  other = jax.tree.map(lambda a: 0.5 * jnp.flip(a, -1), adapters)  # a second, different adapter
  stacked = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=-3), adapters, other)  # the adapter axis
  inputs = make_inputs(**EXACT, batch=3)

  def run(adapter_state, rows):
    return np.asarray(nnx.merge(graphdef, adapter_state, base)(**inputs, adapters=rows))

  mixed = run(stacked, AdapterRows(jnp.array([0, 1, 1]), jnp.array([1.0, 1.0, 0.0])))
  # gathered per-row adapters vs one shared adapter (and vs torch): other programs, float32 rounding only
  atol = FLUX_BOUND * np.abs(mixed).max()
  np.testing.assert_allclose(mixed[0], run(adapters, None)[0], rtol=0, atol=atol)
  np.testing.assert_allclose(mixed[1], run(other, None)[1], rtol=0, atol=atol)
  np.testing.assert_allclose(mixed[2], np.asarray(nnx.merge(graphdef, adapters, base)(
      **inputs, adapters=AdapterRows.uniform(3, scale=0.0)))[2], rtol=0, atol=atol)
  np.testing.assert_allclose(mixed[2], torch_forward(reference[0], inputs)[2], rtol=0, atol=atol)


def test_remat_policies_keep_values_and_gradients(reference, lora_reference):
  inputs = make_inputs(**EXACT)

  def grads(remat):
    model = flux.load_flux_transformer(reference[1], lora=LORA, lora_weights=lora_reference[1], remat=remat)
    graphdef, adapters, base = flux.split_params(model)

    def loss(a, b):
      return jnp.mean(jnp.square(nnx.merge(graphdef, a, b)(**inputs)))

    return jax.jit(jax.value_and_grad(loss))(adapters, base)

  (v0, g0) = grads("none")
  for remat in ("full", "flux"):
    v, g = grads(remat)
    np.testing.assert_allclose(v, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
def test_kontext_dev_lora_count():
  cfg = flux.kontext_dev(lora=LoraSpec(rank=32, alpha=64.0, targets=flux.DEFAULT_LORA_TARGETS))
  _, adapters, _ = flux.split_params(nnx.eval_shape(lambda: flux.FluxTransformer(cfg, rngs=nnx.Rngs(0))))
  # 19 double blocks x 8 projections + 38 single blocks x 3 (to_q/k/v), each 3072 -> 3072, rank 32
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters)) == (19 * 8 + 38 * 3) * 2 * 3072 * 32


# --------------------------------------------------------------------------------------------------
def test_sharded_index_folder_loads(reference, ours, tmp_path):
  """A checkpoint split over two shards with an index json, as save_pretrained writes large models."""
  reader = wio.SafetensorsReader.from_folder(reference[1])
  names = sorted(reader.names())
  halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, part in halves.items():
    wio.save_safetensors({n: np.array(reader.read(n)) for n in part}, str(tmp_path / file))
  with open(tmp_path / "diffusion_pytorch_model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {n: file for file, part in halves.items() for n in part}}, f)
  with open(os.path.join(reference[1], "config.json")) as f, open(tmp_path / "config.json", "w") as g:
    g.write(f.read())
  model = flux.load_flux_transformer(str(tmp_path))
  inputs = make_inputs(**EXACT)
  np.testing.assert_array_equal(np.asarray(model(**inputs)), np.asarray(ours(**inputs)))


def test_lora_file_without_lora_spec_is_an_error(reference, lora_reference):
  with pytest.raises(ValueError, match="LoraSpec"):
    flux.load_flux_transformer(reference[1], lora_weights=lora_reference[1])


# --------------------------------------------------------------------------------------------------
def test_bf16_forward_close_to_float32(reference, ours):
  model = flux.load_flux_transformer(reference[1], dtype="bfloat16")
  inputs = make_inputs(**REAL)
  out = np.asarray(model(**inputs).astype(jnp.float32))
  assert model(**inputs).dtype == jnp.bfloat16
  assert np.isfinite(out).all()
  # measured 8.2e-3; ~47 normalised layers deep (embedders 4, 2 double blocks of 12, 2 single of 8, norm_out 3; see
  # bfloat16_bound)
  assert max_rel_err(out, np.asarray(ours(**inputs))) <= bfloat16_bound(47)


def test_sharded_forward_equals_single_device(reference, ours):
  assert len(jax.devices()) >= 8, "conftest sets 8 host devices"
  mesh = shd.make_mesh((2, 2, 2))
  model = flux.load_flux_transformer(reference[1], mesh=mesh, lora=LORA)
  # stacked blocks: the leading block axis is never split, each chip holds its shard of every block
  kernel = model.transformer_blocks.stacked.attn.to_q.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert {s.data.shape for s in kernel.addressable_shards} == {(TINY["num_layers"], 16, 16)}
  fc2 = model.single_transformer_blocks.stacked.proj_out.kernel[...]
  assert fc2.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  lora_a = model.transformer_blocks.stacked.attn.to_q.lora_a[...]
  assert lora_a.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", None)

  inputs = make_inputs(**EXACT, batch=4)
  with shd.use_mesh(mesh):
    out = jax.jit(lambda m, x: m(**x))(model, inputs)
  # sharded reductions sum in another order: equal up to float32 rounding (measured 3e-7)
  assert max_rel_err(out, ours(**inputs)) <= FLUX_BOUND


def test_scanned_blocks_equal_blocks_kept_apart(reference, lora_reference):
  """The two layouts of `model.scan_blocks` read the same files into the same tensors and compute the same
  forward and gradient (the parity tests above run the scanned one)."""
  scanned = flux.load_flux_transformer(reference[1], lora=LORA, lora_weights=lora_reference[1], remat="flux")
  apart = flux.load_flux_transformer(reference[1], lora=LORA, lora_weights=lora_reference[1], remat="flux",
                                     scan_blocks=False)
  assert isinstance(apart.transformer_blocks, nnx.List) and len(apart.single_transformer_blocks) == 2
  table = flux.FLUX_WEIGHTS + flux.FLUX_LORA_WEIGHTS
  ours, theirs = wio.to_reference(nnx.state(scanned), table), wio.to_reference(nnx.state(apart), table)
  assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
  inputs = make_inputs(**EXACT)
  loss = lambda adapters, graphdef, base: jnp.sum(jnp.square(nnx.merge(graphdef, adapters, base)(**inputs)))
  grads = []
  for model in (scanned, apart):
    graphdef, adapters, base = flux.split_params(model)
    grads.append(wio.to_reference(jax.grad(loss)(adapters, graphdef, base), flux.FLUX_LORA_WEIGHTS))
  # one network, other fusion of the same float32 ops: rounding only (measured 3e-7 relative on the output)
  assert max_rel_err(scanned(**inputs), apart(**inputs)) <= FLUX_BOUND
  assert sorted(grads[0]) == sorted(grads[1])
  # the backward pass re-runs every block once more (about twice the forward's roundings), still the same ops in
  # both layouts: measured 1.0e-6, 25x under FLUX_BOUND
  worst = max(max_rel_err(grads[0][k], grads[1][k]) for k in grads[0] if np.abs(grads[1][k]).max() > 0)
  assert worst <= FLUX_BOUND


def test_lora_targets_naming_some_blocks_keep_that_kind_apart():
  """Adapters on some double blocks only (a partial LoRA file): those blocks stay a list, the single blocks, alike,
  are still scanned; the model is the same function either way."""
  spec = LoraSpec(rank=2, alpha=2.0, targets=("to_q", "transformer_blocks.1.attn.to_k"))
  model = nnx.eval_shape(lambda: flux.FluxTransformer(flux.tiny(lora=spec), rngs=nnx.Rngs(0)))
  assert isinstance(model.transformer_blocks, nnx.List)
  assert model.transformer_blocks[1].attn.to_k.lora_a is not None and model.transformer_blocks[0].attn.to_k.lora_a is None
  assert isinstance(model.single_transformer_blocks, StackedBlocks)
  with pytest.raises(ValueError, match=r"^transformer_blocks.1 is built unlike transformer_blocks.0"):
    StackedBlocks(list(model.transformer_blocks), "transformer_blocks")


def test_lora_target_matching_no_layer_is_an_error():
  """A peft key that matches nothing would train nothing there: refused before any weight is read."""
  with pytest.raises(ValueError) as e:
    flux.check_lora_targets(("to_q", "to_kk"), "config.lora.targets")
  assert str(e.value).startswith("config.lora.targets: target 'to_kk' matches no layer of the FLUX transformer; "
                                 "closest: 'to_k', 'to_q', 'to_v'; adaptable layers: ")
  assert "transformer_blocks.<0-18>.* (14 kinds)" in str(e.value) and "attn.to_k," not in str(e.value)
  flux.check_lora_targets(flux.DEFAULT_LORA_TARGETS + ("transformer_blocks.18.ff.net.2", "proj_mlp"), "x")
  # the model checks its own layers: the tiny preset has 2 double blocks
  spec = LoraSpec(rank=2, alpha=2.0, targets=("to_q", "transformer_blocks.2.attn.to_q", "x"))
  with pytest.raises(ValueError, match=r"^lora.targets: targets 'transformer_blocks.2.attn.to_q', 'x' match no layer"):
    nnx.eval_shape(lambda: flux.FluxTransformer(flux.tiny(lora=spec), rngs=nnx.Rngs(0)))
