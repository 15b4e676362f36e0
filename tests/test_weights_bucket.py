"""Weights in a bucket: ranged reads give the same tensors as the local memory map, and each process of a pod
fetches only the bytes of the shards it places (the storage emulator, tests/gcs_fixtures.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from editr1_jax import paths
from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.models import flux

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDITOR = os.path.join(ROOT, "editr1_jax", "assets", "demo", "editor")


@pytest.mark.parametrize("gap", [0, wio.MERGE_GAP])
def test_ranged_slices_equal_numpy(gcs, tmp_path, monkeypatch, gap):
  monkeypatch.setattr(wio, "MERGE_GAP", gap)
  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((6, 5, 4, 3)).astype(np.float32), "b": rng.standard_normal((7, 9)),
             "c": np.arange(5, dtype=np.int32), "s": np.ones((1,), np.float32)}
  local = str(tmp_path / "w.safetensors")
  wio.save_safetensors(tensors, local)
  url = gcs.url("w.safetensors")
  paths.copy_file(local, url)
  reader, on_disk = wio.SafetensorsReader([url]), wio.SafetensorsReader([local])
  cases = [("a", "identity", (slice(1, 4), slice(None), 2, slice(0, 1))), ("a", "conv2d", (slice(1, 3), 0)),
           ("a", "identity", (slice(2, 2),)), ("b", "linear", (slice(2, 7), slice(1, 4))), ("b", "lora", (0, 3)),
           ("b", "lora", (slice(None), slice(4, 9), slice(0, 2))), ("c", "identity", (slice(1, 4),)),
           ("s", "identity", (0,))]
  for name, layout, idx in cases:
    want = wio.LAYOUTS[layout](on_disk.read(name))[idx]
    got = wio.LAYOUTS[layout](reader.read(name))[idx]
    assert got.shape == np.shape(want) and got.dtype == np.asarray(want).dtype, (name, layout, idx)
    np.testing.assert_array_equal(got, want, err_msg=f"{name} {layout} {idx}")
  np.testing.assert_array_equal(np.asarray(reader.read("b").T), tensors["b"].T)
  # exact ranges (gap 0) fetch exactly the bytes asked for; merged ranges at most the tensors' bytes
  assert reader.bytes_read > 0
  if gap == 0:
    reader = wio.SafetensorsReader([url])
    reader.read("b")[2:5, 3:6]
    assert reader.bytes_read == 3 * 3 * 8


def test_transformer_from_bucket_equals_local(gcs):
  """The demo's FLUX.1-Kontext transformer on 8 devices (fsdp 4, tensor 2), from a bucket and from disk."""
  url = gcs.upload(EDITOR, "editor")
  mesh = shd.make_mesh((1, 4, 2))
  local = flux.load_flux_transformer(EDITOR, mesh=mesh)
  remote = flux.load_flux_transformer(url, mesh=mesh)
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(local)), nnx.to_flat_state(nnx.state(remote))):
    assert a.get_value().sharding == b.get_value().sharding, path
    np.testing.assert_array_equal(jax.device_get(a.get_value()), jax.device_get(b.get_value()), err_msg=str(path))


TWO_PROCESSES = r"""
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from flax import nnx
from editr1_jax import sharding as shd, weights as wio
from editr1_jax.models import flux
wio.MERGE_GAP = int(sys.argv[4])
folder = wio.model_folder(sys.argv[3], "transformer")
reader = wio.SafetensorsReader.from_folder(folder)
cfg = flux.FluxConfig.from_diffusers_config(wio.read_config(folder))
abstract = nnx.eval_shape(lambda: flux.FluxTransformer(cfg, rngs=nnx.Rngs(0)))
_, _, abstract_base = flux.split_params(abstract)
mesh = shd.make_mesh((1, 2, 1))
state = wio.load_state(abstract_base, reader, flux.FLUX_WEIGHTS, source=folder, mesh=mesh)
itemsize, = {e.dtype.itemsize for e in reader._entries.values()}  # the demo's file is bfloat16 throughout
held = 0  # bytes of the distinct shards this process places, counted in the file's dtype
for _, var in nnx.to_flat_state(state):
  held += sum(s.data.size for s in var.get_value().addressable_shards) * itemsize
print(json.dumps({"read": reader.bytes_read, "held": held,
                  "total": sum(int(e.end - e.start) for e in reader._entries.values())}))
"""


def test_each_process_reads_its_shards(gcs):
  """Two processes under jax.distributed, FSDP over both: with exact ranges each fetches the bytes of the shards it
  holds and nothing else; with merged ranges (the default) less than the whole file."""
  from gcs_fixtures import free_port  # pylint: disable=import-outside-toplevel
  url = gcs.upload(EDITOR, "editor")
  results = {}
  for gap in (0, wio.MERGE_GAP):
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, f"127.0.0.1:{port}", str(i), url, str(gap)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
      assert p.returncode == 0, err[-3000:]
    results[gap] = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  print("bytes read per process:", results)
  for r in results[0]:
    assert r["read"] == r["held"] < r["total"]
  for r in results[wio.MERGE_GAP]:
    assert r["held"] <= r["read"] < r["total"]
