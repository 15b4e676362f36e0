"""A real Cloud Storage API for the tests: `gcp-storage-emulator` (requirements-test.txt) on a free port.

The `gcs` fixture starts one emulator per test session (in memory), points every client at it (gcsfs and etils
through STORAGE_EMULATOR_HOST, tensorstore / orbax through TENSORSTORE_GCS_HTTP_URL; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
off, else gcsfs waits 60 s per bucket asking its layout over gRPC) and yields a `Bucket` helper. Subprocesses
started by a test inherit the variables.
"""

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

EMULATOR_ENV = {
    "STORAGE_EMULATOR_HOST": "http://127.0.0.1:{port}",
    "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:{port}",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Bucket:
  """A bucket of the emulator, with a fresh prefix per call of `url`."""

  def __init__(self, name: str):
    self.name = name

  def url(self, *parts: str) -> str:
    """gs://<bucket>/<unique>/<parts>: each test gets its own prefix."""
    return "/".join([f"gs://{self.name}", uuid.uuid4().hex[:8], *parts])

  def upload(self, local: str, *parts: str) -> str:
    """A local folder copied under a fresh prefix; its URL."""
    from editr1_jax import paths  # pylint: disable=import-outside-toplevel
    url = self.url(*parts)
    paths.upload_folder(local, url)
    return url


# The emulator's HTTP server answers one connection at a time with a listen backlog of 5: concurrent ranged reads
# from several processes overflow it and stall in TCP retransmits. A deep backlog queues them instead.
LAUNCH = ("import sys, http.server\n"
          "http.server.HTTPServer.request_queue_size = 1024\n"
          "from gcp_storage_emulator.__main__ import main\n"
          "main(sys.argv[1:])\n")


@pytest.fixture(scope="session")
def gcs():
  port = free_port()
  proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
                           "--default-bucket=editr1-test"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  saved = {k: os.environ.get(k) for k in EMULATOR_ENV}
  os.environ.update({k: v.format(port=port) for k, v in EMULATOR_ENV.items()})
  try:
    deadline = time.time() + 30
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        if time.time() > deadline or proc.poll() is not None:
          raise RuntimeError("the storage emulator did not start")
        time.sleep(0.1)
    from editr1_jax import paths  # pylint: disable=import-outside-toplevel
    paths._gcs.cache_clear()  # pylint: disable=protected-access
    yield Bucket("editr1-test")
  finally:
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    from editr1_jax import paths  # pylint: disable=import-outside-toplevel
    paths._gcs.cache_clear()  # pylint: disable=protected-access
