"""Test setup: 8 host devices for sharding tests, highest matmul precision, no hub access."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Shared fixtures (tiny reference models written to disk once per test module that uses them).
pytest_plugins = ["flux_fixtures", "text_fixtures", "qwen_fixtures"]
