"""Test setup: 8 host devices for sharding tests, highest matmul precision, no hub access."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One compilation cache for the session (and the subprocesses it starts): the many tests that build the same
# tiny trainer compile each program once. Fresh per session, removed at exit: nothing carries between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="editr1_jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Shared fixtures (tiny reference models written to disk once per test module that uses them).
pytest_plugins = ["gcs_fixtures", "flux_fixtures", "text_fixtures", "qwen_fixtures", "qwen_image_fixtures",
                  "qwen_image_pipeline_fixtures"]
