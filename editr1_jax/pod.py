"""One pod, one program: what every process of a run must share, checked at start, and the compiled steps kept
across restarts.

`check_same_program`: each process publishes the SHA-256 of every source file of the package and of the run
configs, its resolved config and its data fingerprint through jax's coordination service (the key-value store
`jax.distributed.initialize` starts); each compares with process 0 and publishes its verdict; then every process
reads every verdict, so all of them refuse together, with a message naming the process and the difference (a
process that ran other code, was given another flag, or sees other data would otherwise train a different model
silently, or hang in a collective).

`enable_compile_cache`: jax's persistent compilation cache in `config.compile_cache_dir` (default
`<workdir>/compile_cache`, a bucket URL allowed): a restarted run on the same topology loads its compiled steps
instead of compiling them again.
"""

import hashlib
import json
import logging
import os

import jax

from editr1_jax import paths

_LOG = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("editr1_jax", "configs", "launch")  # the program: every .py below these folders of the checkout
TIMEOUT_MS = 10 * 60 * 1000  # a process may still be loading or hashing data when another publishes


class PodMismatch(RuntimeError):
  """The processes of one run do not run the same program on the same data."""


def source_digests(root: str = ROOT) -> dict[str, str]:
  """{relative path: SHA-256} of the program's source files."""
  out = {}
  for top in SOURCES:
    for folder, dirs, names in os.walk(os.path.join(root, top)):
      dirs[:] = sorted(d for d in dirs if d != "__pycache__")
      for name in sorted(names):
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          with open(path, "rb") as f:
            out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _flatten(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def differences(mine: dict, theirs: dict) -> list[str]:
  """What differs between two processes' published facts (`theirs`: process 0's), a few words each."""
  out = []
  code = sorted(f for f in set(mine["code"]) | set(theirs["code"]) if mine["code"].get(f) != theirs["code"].get(f))
  if code:
    out.append(f"source files differ: {', '.join(code[:5])}{' ...' if len(code) > 5 else ''}")
  a, b = _flatten(mine["config"]), _flatten(theirs["config"])
  for field in sorted(set(a) | set(b)):
    if a.get(field) != b.get(field):
      out.append(f"config.{field} = {json.dumps(a.get(field))} (process 0: {json.dumps(b.get(field))})")
  if mine["data"] != theirs["data"]:
    out.append(f"data fingerprint {mine['data'][:12]} (process 0: {theirs['data'][:12]})")
  return out


def check_same_program(config_json: dict, data_digest: str, *, tag: str = "start") -> None:
  """Refuses (every process, PodMismatch) unless all processes run the same code, config and data."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  client = distributed.global_state.client
  me = jax.process_index()
  facts = {"code": source_digests(), "config": config_json, "data": data_digest}
  client.key_value_set(f"editr1/{tag}/facts/{me}", json.dumps(facts))
  reference = json.loads(client.blocking_key_value_get(f"editr1/{tag}/facts/0", TIMEOUT_MS))
  verdict = "; ".join(differences(facts, reference)) if me else ""
  client.key_value_set(f"editr1/{tag}/verdict/{me}", verdict or "same")
  found = []
  for i in range(jax.process_count()):
    v = client.blocking_key_value_get(f"editr1/{tag}/verdict/{i}", TIMEOUT_MS)
    if v != "same":
      found.append(f"process {i}: {v}")
  if found:
    raise PodMismatch("the processes of this run differ from process 0 (run the same checkout, command and data "
                      "on every host): " + " | ".join(found))


def compile_cache_dir(config, workdir: str) -> str | None:
  """Where compiled steps are kept: `config.compile_cache_dir`; "" = `<workdir>/compile_cache` (or
  $JAX_COMPILATION_CACHE_DIR when set); "none" = no cache."""
  value = config.compile_cache_dir
  if value == "none":
    return None
  if value:
    return value
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or paths.join(workdir, "compile_cache")


def enable_compile_cache(directory: str | None) -> None:
  """jax's persistent compilation cache in `directory` (a local folder or a bucket URL); every compile that takes
  at least `jax_persistent_cache_min_compile_time_secs` (1 s unless set) is stored there."""
  if directory is None:
    return
  paths.makedirs(directory)
  if jax.config.jax_compilation_cache_dir != directory:
    from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", directory)
    compilation_cache.reset_cache()  # a cache already opened in this process would keep its old folder
  _LOG.info("compilation cache: %s", directory)
