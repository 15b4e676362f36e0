"""Export to PyTorch: our LoRA file loads into diffusers' FluxKontextPipeline, the merged folder into
FluxTransformer2DModel, and both reproduce our model's output."""

import os

import jax
import numpy as np
import pytest
from flax import nnx
from flux_fixtures import EXACT, FLUX_BOUND, LORA, make_inputs, torch_forward
from helpers import max_rel_err

from editr1_jax import export
from editr1_jax import weights as wio
from editr1_jax.models import flux
from editr1_jax.weights import CheckpointError


@pytest.fixture(scope="module")
def trained(reference):
  """Our model with a non-trivial adapter, as after training."""
  model = flux.load_flux_transformer(reference[1], lora=LORA)
  graphdef, adapters, base = flux.split_params(model)
  keys = iter(jax.random.split(jax.random.key(7), 1000))
  adapters = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), adapters)
  return graphdef, adapters, base


def _pipeline(transformer):
  from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
  return FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def test_lora_export_loads_into_diffusers_pipeline(reference, trained, tmp_path):
  from diffusers import FluxTransformer2DModel
  graphdef, adapters, base = trained
  path = export.save_lora(adapters, LORA, str(tmp_path))
  assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
  pipe = _pipeline(FluxTransformer2DModel.from_pretrained(reference[1]).eval())
  pipe.load_lora_weights(str(tmp_path))
  inputs = make_inputs(**EXACT)
  ours = np.asarray(nnx.merge(graphdef, adapters, base)(**inputs))
  assert max_rel_err(ours, torch_forward(pipe.transformer, inputs)) <= FLUX_BOUND  # float32 rounding only
  assert max_rel_err(ours, torch_forward(reference[0], inputs)) > 1e-2  # the adapter matters


def test_lora_export_round_trips_through_our_loader(reference, trained, tmp_path):
  graphdef, adapters, base = trained
  export.save_lora(adapters, LORA, str(tmp_path))
  model = flux.load_flux_transformer(reference[1], lora=LORA, lora_weights=str(tmp_path / export.LORA_FILE))
  _, loaded, _ = flux.split_params(model)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapters)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  wrong = flux.LoraSpec(rank=LORA.rank, alpha=2 * LORA.alpha, targets=LORA.targets)
  with pytest.raises(CheckpointError, match="alpha"):
    flux.load_flux_transformer(reference[1], lora=wrong, lora_weights=str(tmp_path / export.LORA_FILE))


def test_merged_export_equals_adapted_model(trained, tmp_path):
  from diffusers import FluxTransformer2DModel
  graphdef, adapters, base = trained
  cfg = nnx.merge(graphdef, adapters, base).cfg
  folder = export.save_transformer(export.merge_adapters(adapters, base, LORA), cfg, str(tmp_path / "transformer"))
  ref = FluxTransformer2DModel.from_pretrained(folder).eval()
  inputs = make_inputs(**EXACT)
  ours = np.asarray(nnx.merge(graphdef, adapters, base)(**inputs))
  # W + B A merged in float32 rounds once more per weight (eps, far under the forward's FLUX_BOUND)
  assert max_rel_err(ours, torch_forward(ref, inputs)) <= FLUX_BOUND
  # and our own loader reads the merged folder back (with a no-op fresh adapter)
  assert max_rel_err(ours, flux.load_flux_transformer(folder)(**inputs)) <= FLUX_BOUND


def test_merged_export_shards_large_models(trained, tmp_path, monkeypatch):
  graphdef, adapters, base = trained
  monkeypatch.setattr(export, "SHARD_BYTES", 20_000)
  folder = export.save_transformer(base, nnx.merge(graphdef, adapters, base).cfg, str(tmp_path / "t"))
  assert os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"))
  assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
  loaded = flux.load_flux_transformer(folder)
  # every tensor back bit for bit from the shards
  ours, read = wio.to_reference(base, flux.FLUX_WEIGHTS), wio.to_reference(nnx.state(loaded), flux.FLUX_WEIGHTS)
  assert sorted(ours) == sorted(read) and all(np.array_equal(ours[k], read[k]) for k in ours)
  # so the same forward as the base with no-op adapters, up to the other fusion of a model without adapters
  inputs = make_inputs(**EXACT)
  no_op = nnx.merge(graphdef, jax.tree.map(lambda a: 0 * a, adapters), base)
  assert max_rel_err(loaded(**inputs), no_op(**inputs)) <= FLUX_BOUND


# --------------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args,error", [
    (["--workdir={tmp}/typo", "--out={tmp}/out"], "error: --workdir: {tmp}/typo/checkpoints does not exist"),
    (["--workdir={tmp}/run", "--out={tmp}/file"], "error: --out: {tmp}/file is an existing file, not a folder"),
    (["--workdir={tmp}/run", "--out={tmp}/out", "--epoch=-1"], "error: --epoch must be >= 0, got -1"),
])
def test_launch_export_refuses_bad_arguments_and_creates_nothing(tmp_path, args, error):
  import subprocess
  import sys
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  (tmp_path / "file").write_text("")
  before = sorted(p for p in tmp_path.rglob("*"))
  result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export.py"),
                           *(a.format(tmp=tmp_path) for a in args)], capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and result.stderr.strip().splitlines() == [error.format(tmp=tmp_path)]
  assert sorted(p for p in tmp_path.rglob("*")) == before
