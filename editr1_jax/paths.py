"""One path layer: every file the project reads or writes goes through here, so that a Cloud Storage URL
(`gs://bucket/...`) works wherever a local path does.

Local paths use the operating system directly (atomic `os.replace`, memory maps); URLs go through fsspec's
`gcsfs` client (`requirements.txt`), the same one `etils.epath` and tensorstore (orbax) talk to. What differs in a
bucket, and how it is handled:
- there are no folders: `makedirs` is a no-op and a "folder" exists when an object lives under it;
- an object appears whole when its upload finishes, so `write_bytes` / `write_text` are atomic without a rename;
- renaming a folder is a copy then a delete (used only to set a damaged checkpoint aside);
- listings are never cached here, so that one process sees what another has just written.

Libraries that only open local files (tokenizers, array_record) get a local copy of a small folder through
`local_copy`, kept under `cache_root()` (`$EDITR1_CACHE`, default `~/.cache/editr1_jax`), refreshed when an object's
size changes. Weights are never copied: `read_range` reads the bytes a process needs (`weights.SafetensorsReader`).

Credentials: the client uses Application Default Credentials (a TPU / GCE VM's service account, `gcloud auth
application-default login`, or `GOOGLE_APPLICATION_CREDENTIALS`); with `STORAGE_EMULATOR_HOST` set (tests, a local
emulator) it talks to the emulator anonymously.
"""

import builtins
import functools
import hashlib
import json
import logging
import os
import posixpath
from typing import Iterable

SUPPORTED_SCHEMES = ("gs",)
logging.getLogger("fsspec.caching").setLevel(logging.WARNING)  # a line per file opened in a bucket otherwise
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


class PathError(ValueError):
  """A path or URL that cannot be used: one short line naming it and what is wrong."""


def scheme(path: str) -> str:
  """'gs' for gs://..., '' for a local path."""
  path = os.fspath(path)
  return path.split("://", 1)[0] if "://" in path else ""


def is_url(path) -> bool:
  return bool(scheme(path))


def check_scheme(path, what: str = "path") -> None:
  """A URL of a scheme we do not support (s3://, http://, ...) is refused by name."""
  s = scheme(path)
  if s and s not in SUPPORTED_SCHEMES:
    raise PathError(f"{what} {path}: URL scheme {s}:// is not supported (use a local path or gs://bucket/...)")


_checked_credentials: set[str] = set()


def _check_credentials(path: str) -> None:
  """No credentials is one short error saying how to provide them (checked once per scheme, before any request)."""
  if os.environ.get(EMULATOR_ENV) or "gs" in _checked_credentials:
    return
  import google.auth  # pylint: disable=import-outside-toplevel
  import google.auth.exceptions  # pylint: disable=import-outside-toplevel
  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError:
    raise PathError(f"{path}: no Google Cloud credentials found. On a TPU or GCE VM the VM's service account is used; "
                    "elsewhere run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a "
                    "service-account key file") from None
  _checked_credentials.add("gs")


@functools.lru_cache(maxsize=None)
def _gcs():
  import gcsfs  # pylint: disable=import-outside-toplevel
  return gcsfs.GCSFileSystem(use_listings_cache=False)


def _fs(path: str):
  check_scheme(path)
  _check_credentials(path)
  return _gcs()


def _strip(path: str) -> str:
  return os.fspath(path).split("://", 1)[1].rstrip("/")


def bucket(path: str) -> str:
  return _strip(path).split("/", 1)[0]


def join(path, *parts) -> str:
  path = os.fspath(path)
  if is_url(path):
    return posixpath.join(path, *parts)
  return os.path.join(path, *parts)


def absolute(path) -> str:
  """A local path made absolute; a URL normalised (no trailing slash, no `.` or `..`)."""
  path = os.fspath(path)
  if is_url(path):
    return normpath(path)
  return os.path.abspath(path)


def normpath(path) -> str:
  path = os.fspath(path)
  if is_url(path):
    return f"{scheme(path)}://" + posixpath.normpath(_strip(path))
  return os.path.normpath(path)


def relpath(path, start) -> str:
  path, start = os.fspath(path), os.fspath(start)
  if is_url(path) or is_url(start):
    if scheme(path) != scheme(start) or bucket(path) != bucket(start):
      raise PathError(f"{path} is not inside {start}")
    return posixpath.relpath("/" + _strip(normpath(path)), "/" + _strip(normpath(start)))
  return os.path.relpath(path, start)


def is_inside(path, root) -> bool:
  """`path` is `root` or below it (both normalised first)."""
  path, root = absolute(path), absolute(root)
  if is_url(path) or is_url(root):
    return path == root or path.startswith(root.rstrip("/") + "/")
  return os.path.commonpath([root, path]) == root


def basename(path) -> str:
  return posixpath.basename(os.fspath(path).rstrip("/")) if is_url(path) else os.path.basename(path)


def dirname(path) -> str:
  path = os.fspath(path)
  if is_url(path):
    return f"{scheme(path)}://" + posixpath.dirname(_strip(path))
  return os.path.dirname(path)


def splitext(path) -> tuple[str, str]:
  return posixpath.splitext(os.fspath(path)) if is_url(path) else os.path.splitext(path)


def exists(path) -> bool:
  path = os.fspath(path)
  return _fs(path).exists(path) if is_url(path) else os.path.exists(path)


def isfile(path) -> bool:
  path = os.fspath(path)
  return _fs(path).isfile(path) if is_url(path) else os.path.isfile(path)


def isdir(path) -> bool:
  """A local folder, or a bucket prefix with at least one object under it (or the bucket itself)."""
  path = os.fspath(path)
  return _fs(path).isdir(path) if is_url(path) else os.path.isdir(path)


def getsize(path) -> int:
  path = os.fspath(path)
  return int(_fs(path).size(path)) if is_url(path) else os.path.getsize(path)


def listdir(path) -> list[str]:
  """The names directly under a folder (files and folders), sorted."""
  path = os.fspath(path)
  if is_url(path):
    return sorted(basename(p) for p in _fs(path).ls(path, detail=False) if p.rstrip("/") != _strip(path))
  return sorted(os.listdir(path))


def _version(info: dict) -> tuple[int, str]:
  return int(info["size"]), str(info.get("generation") or info.get("updated") or info.get("mtime"))


def stat(path) -> tuple[int, str] | None:
  """(size, version) of a file, None when there is none; the version changes whenever the file is rewritten (a
  local file's mtime in ns, a bucket object's generation)."""
  path = os.fspath(path)
  if is_url(path):
    try:
      info = _fs(path).info(path)
    except FileNotFoundError:
      return None
    return _version(info) if info.get("type") == "file" else None
  if not os.path.isfile(path):
    return None
  st = os.stat(path)
  return st.st_size, str(st.st_mtime_ns)


def stat_tree(folder) -> dict[str, tuple[int, str]]:
  """{path: `stat(path)`} of every file below `folder` (paths as `join(folder, relative)` gives them, normalised);
  in a bucket one listing, not a request per file."""
  folder = os.fspath(folder)
  if is_url(folder):
    return {f"{scheme(folder)}://{name}": _version(info) for name, info in _fs(folder).find(folder, detail=True).items()}
  return {normpath(join(folder, rel)): stat(join(folder, rel)) for rel in walk_files(folder)}


def walk_files(folder) -> list[str]:
  """Every file below `folder`, as paths relative to it, sorted."""
  folder = os.fspath(folder)
  if is_url(folder):
    root = _strip(folder)
    return sorted(posixpath.relpath(p, root) for p in _fs(folder).find(folder))
  out = []
  for root, _, names in os.walk(folder):
    out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
  return sorted(out)


def glob(folder, suffix: str) -> list[str]:
  """Every file below `folder` whose name ends with `suffix` (full paths, sorted)."""
  return [join(folder, rel) for rel in walk_files(folder) if rel.endswith(suffix)]


def open(path, mode: str = "r", **kwargs):  # pylint: disable=redefined-builtin
  path = os.fspath(path)
  if is_url(path):
    return _fs(path).open(path, mode, **kwargs)
  return builtins.open(path, mode, **kwargs)


def read_bytes(path) -> bytes:
  path = os.fspath(path)
  if is_url(path):
    return _fs(path).cat_file(path)
  with builtins.open(path, "rb") as f:
    return f.read()


def sha256(path) -> str:
  """The SHA-256 of a file, read in blocks (checkpoint manifests, data fingerprints)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()


def read_text(path, encoding: str = "utf-8") -> str:
  return read_bytes(path).decode(encoding)


def makedirs(path) -> None:
  """A local folder and its parents; nothing for a URL (a bucket has no folders)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def write_bytes(path, data: bytes) -> None:
  """Write a whole file atomically: readers see the old file or the new one, never a part."""
  path = os.fspath(path)
  if is_url(path):
    _fs(path).pipe_file(path, bytes(data))
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with builtins.open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path, text: str, encoding: str = "utf-8") -> None:
  write_bytes(path, text.encode(encoding))


def append_text(path, text: str, encoding: str = "utf-8") -> None:
  """Append to a text file. An object in a bucket cannot be appended to: it is rewritten whole (atomically)."""
  path = os.fspath(path)
  if is_url(path):
    old = read_bytes(path) if isfile(path) else b""
    write_bytes(path, old + text.encode(encoding))
    return
  with builtins.open(path, "a", encoding=encoding) as f:
    f.write(text)


def copy_file(src, dst) -> None:
  src, dst = os.fspath(src), os.fspath(dst)
  if is_url(src) and is_url(dst):
    _fs(src).copy(src, dst)
  elif is_url(dst):
    _fs(dst).put_file(src, dst)
  elif is_url(src):
    makedirs(os.path.dirname(os.path.abspath(dst)))
    _fs(src).get_file(src, dst)
  else:
    import shutil  # pylint: disable=import-outside-toplevel
    makedirs(os.path.dirname(os.path.abspath(dst)))
    shutil.copyfile(src, dst)


def upload_folder(local: str, url: str) -> None:
  """Every file below the local folder `local`, written under `url` (or another local folder)."""
  for rel in walk_files(local):
    copy_file(os.path.join(local, rel), join(url, rel))


def rename(src, dst) -> None:
  """A file or folder moved. In a bucket: copied object by object, then deleted (not atomic)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if is_url(src):
    fs = _fs(src)
    for rel in walk_files(src):
      fs.copy(join(src, rel), join(dst, rel))
    fs.rm(src, recursive=True)
  else:
    os.rename(src, dst)


def rmtree(path) -> None:
  path = os.fspath(path)
  if is_url(path):
    if exists(path):
      _fs(path).rm(path, recursive=True)
  else:
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(path, ignore_errors=False)


def remove(path) -> None:
  path = os.fspath(path)
  if is_url(path):
    _fs(path).rm_file(path)
  else:
    os.remove(path)


def read_range(path, start: int, end: int) -> bytes:
  """Bytes [start, end) of a file: only those are read (one ranged request in a bucket)."""
  return read_ranges(path, [start], [end])[0]


def read_ranges(path, starts: Iterable[int], ends: Iterable[int]) -> list[bytes]:
  """Several byte ranges of one file (concurrent ranged requests in a bucket)."""
  path = os.fspath(path)
  starts, ends = list(starts), list(ends)
  if is_url(path):
    return _fs(path).cat_ranges([path] * len(starts), starts, ends)
  out = []
  with builtins.open(path, "rb") as f:
    for s, e in zip(starts, ends):
      f.seek(s)
      out.append(f.read(e - s))
  return out


def cache_root() -> str:
  return os.environ.get("EDITR1_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "editr1_jax")


def local_copy(folder, *, skip_suffixes: tuple[str, ...] = (".safetensors",)) -> str:
  """A local folder with the files of `folder` (all of it, below too), for libraries that open local files only.
  A local folder is returned as is. Files ending with `skip_suffixes` (weights) are not copied."""
  folder = os.fspath(folder)
  if not is_url(folder):
    return folder
  fs = _fs(folder)
  target = os.path.join(cache_root(), scheme(folder), _strip(folder))
  record = target + ".versions.json"  # {relative path: object version} of what the copy holds, kept beside it
  try:
    with builtins.open(record, encoding="utf-8") as f:
      held = json.load(f)
  except (OSError, ValueError):
    held = {}
  versions = {}
  for path, (size, version) in stat_tree(folder).items():
    rel = relpath(path, folder)
    if rel.endswith(skip_suffixes):
      continue
    local = os.path.join(target, rel)
    versions[rel] = f"{size}:{version}"
    if held.get(rel) == versions[rel] and os.path.isfile(local):
      continue
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp{os.getpid()}"
    fs.get_file(path, tmp)
    os.replace(tmp, local)
  for rel in set(held) - set(versions):  # deleted in the bucket since the last copy
    if os.path.isfile(os.path.join(target, rel)):
      os.remove(os.path.join(target, rel))
  write_text(record, json.dumps(versions, sort_keys=True))
  return target


def check_input(path, what: str, *, kind: str = "folder") -> None:
  """An input that must exist: one short PathError naming `what` (a config field, a flag) when it cannot be used
  (unsupported scheme, no credentials, no such bucket, no such object or folder). `kind`: "folder", "file" or
  "any"."""
  path = os.fspath(path)
  check_scheme(path, what)
  if is_url(path):
    check_bucket(path, what)
  ok = {"folder": isdir, "file": isfile, "any": exists}[kind](path)
  if not ok:
    noun = {"folder": "folder", "file": "file", "any": "file or folder"}[kind]
    raise PathError(f"{what} {path}: {noun} not found")


def check_bucket(path, what: str) -> None:
  """The bucket of a URL exists and these credentials can see it."""
  path = os.fspath(path)
  check_scheme(path, what)
  if not is_url(path):
    return
  fs = _fs(path)
  try:
    found = fs.exists(f"{scheme(path)}://{bucket(path)}")
  except Exception as e:  # an HTTP error (403 forbidden, ...) of the client
    raise PathError(f"{what} {path}: cannot reach bucket {bucket(path)!r}: {str(e)[:200]}") from None
  if not found:
    raise PathError(f"{what} {path}: bucket {bucket(path)!r} does not exist (or these credentials cannot see it)")


def check_output(path, what: str) -> None:
  """A place to write: a URL's bucket must exist; a local path must not be an existing file."""
  path = os.fspath(path)
  check_scheme(path, what)
  if is_url(path):
    check_bucket(path, what)
  elif os.path.isfile(path):
    raise PathError(f"{what} {path}: is a file, a folder is needed")
