"""pod.py without several processes: what two processes' differences read like, where the compile cache goes."""

import ml_collections

from editr1_jax import pod


def test_differences_name_files_fields_and_data():
  mine = {"code": {"editr1_jax/nft.py": "a", "configs/base.py": "b", "launch/new.py": "c"},
          "config": {"seed": 1, "optim": {"learning_rate": 0.002, "b1": 0.9}}, "data": "f" * 64}
  process0 = {"code": {"editr1_jax/nft.py": "a", "configs/base.py": "x"},
              "config": {"seed": 0, "optim": {"learning_rate": 0.002, "b1": 0.9}}, "data": "e" * 64}
  assert pod.differences(mine, process0) == [
      "source files differ: configs/base.py, launch/new.py", "config.seed = 1 (process 0: 0)",
      f"data fingerprint {'f' * 12} (process 0: {'e' * 12})"]
  assert pod.differences(process0, process0) == []


def test_source_digests_cover_the_program():
  digests = pod.source_digests()
  assert {"editr1_jax/pod.py", "configs/base.py", "launch/train.py"} <= set(digests)
  assert all(len(v) == 64 for v in digests.values()) and not any("__pycache__" in f for f in digests)


def test_compile_cache_dir(monkeypatch):
  c = ml_collections.ConfigDict({"compile_cache_dir": ""})
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  assert pod.compile_cache_dir(c, "gs://b/run") == "gs://b/run/compile_cache"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/elsewhere")
  assert pod.compile_cache_dir(c, "/runs/x") == "/tmp/elsewhere"
  c.compile_cache_dir = "gs://b/cache"
  assert pod.compile_cache_dir(c, "/runs/x") == "gs://b/cache"
  c.compile_cache_dir = "none"
  assert pod.compile_cache_dir(c, "/runs/x") is None
