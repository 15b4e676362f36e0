"""Checkpoint I/O: safetensors folders (single file or sharded with an index json), streamed.

A model declares one table of `WeightRule`s that turns each of its parameter paths into the
reference (PyTorch) tensor name and layout. Loading walks the abstract model, reads each tensor
lazily (a memory map for a local file; ranged reads for a file in a bucket, `RangedTensor`), lays it
out, casts it and places it into its target sharding; nothing is zero-filled or cast across kinds:
every missing, unexpected, mis-shaped or non-float tensor is reported together.

In a bucket, each process reads only the bytes of the shards it places on its own devices
(`jax.make_array_from_callback` asks for those only), never whole files; `SafetensorsReader.bytes_read`
counts them.
"""

import dataclasses
import itertools
import json
import os
import re
import struct
import types
import typing
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

from editr1_jax import paths
from editr1_jax import sharding as shd
from editr1_jax.layers import STACKED, layer_paths

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint does not match the model: names every offending tensor."""


@dataclasses.dataclass(frozen=True)
class _Entry:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int
  end: int


def _read_json(path: str) -> dict:
  """A JSON object from `path`; anything else is one CheckpointError naming the file."""
  try:
    value = json.loads(paths.read_text(path))
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise CheckpointError(f"{path}: not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise CheckpointError(f"{path}: not a JSON object")
  return value


def _is_index(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: str, name: str, info, base: int, data_size: int) -> _Entry:
  """One header entry, checked against the data section's size so a read never runs past the file."""
  if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
    raise CheckpointError(f"{path}: tensor {name!r}: header entry needs dtype, shape and data_offsets, "
                          f"got {info!r:.200}")
  dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if not isinstance(dtype, str) or dtype not in _DTYPES:
    raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
  if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
    raise CheckpointError(f"{path}: tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)
          and offsets[0] <= offsets[1]):
    raise CheckpointError(f"{path}: tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                          f"got {offsets!r}")
  start, end = offsets
  if end > data_size:
    raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {offsets} run past the end of the data "
                          f"({data_size} bytes): the file is truncated")
  np_dtype = np.dtype(_DTYPES[dtype])
  nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
  if end - start != nbytes:
    raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {offsets} hold {end - start} bytes; "
                          f"{dtype} {shape} needs {nbytes}")
  return _Entry(path, np_dtype, tuple(shape), base + start, base + end)


def _read_header(path: str) -> tuple[dict[str, _Entry], dict[str, str]]:
  """({tensor name: entry}, metadata) of one file; sizes are checked against the file before anything is
  allocated, so a damaged or foreign file is one CheckpointError, never a bad read. Reads the header only."""
  size = paths.getsize(path)
  raw = paths.read_range(path, 0, min(8, size))
  if len(raw) != 8:
    raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
  (n,) = struct.unpack("<Q", raw)
  if n > size - 8:
    raise CheckpointError(f"{path}: header length {n} exceeds the file's {size} bytes: truncated or not a "
                          "safetensors file")
  try:
    header = json.loads(paths.read_range(path, 8, 8 + n))
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise CheckpointError(f"{path}: unreadable safetensors header: {e}") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: safetensors header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {metadata!r:.200}")
  entries = {name: _entry(path, name, info, 8 + n, size - 8 - n) for name, info in header.items()}
  spans = sorted(((e.start, e.end, name) for name, e in entries.items() if e.end > e.start))
  for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
    if start < end:
      raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
  return entries, metadata


MERGE_GAP = 1 << 20  # ranges of one tensor closer than this are read in one request: fewer requests over fewer bytes


class RangedTensor:
  """A tensor of a safetensors file in a bucket, read when indexed: only the bytes of the slice asked for.

  In the file's row-major order a slice is one run of contiguous bytes per combination of its leading indices;
  runs closer than `MERGE_GAP` are fetched in one ranged request, all requests concurrently. Supports what the
  layouts (`LAYOUTS`) and `load_state` do with a tensor: `.T`, `.transpose`, a leading `[None]`, slicing with
  unit-step slices or integers, `np.asarray`. Slices already read are kept (devices that hold the same shard
  read it once).
  """

  def __init__(self, entry: _Entry, counter: list, perm: tuple[int, ...] | None = None, lead: int = 0,
               cache: dict | None = None):
    self._entry, self._counter, self._lead = entry, counter, lead
    self._perm = tuple(range(len(entry.shape))) if perm is None else perm
    self._cache = {} if cache is None else cache

  @property
  def dtype(self) -> np.dtype:
    return self._entry.dtype

  @property
  def shape(self) -> tuple[int, ...]:
    return (1,) * self._lead + tuple(self._entry.shape[p] for p in self._perm)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def T(self) -> "RangedTensor":  # pylint: disable=invalid-name
    return self.transpose(*reversed(range(self.ndim)))

  def transpose(self, *axes) -> "RangedTensor":
    if self._lead:
      raise NotImplementedError("transpose after adding axes")
    return RangedTensor(self._entry, self._counter, tuple(self._perm[a] for a in axes), 0, self._cache)

  def __array__(self, dtype=None, copy=None):
    out = self[(slice(None),) * self.ndim]
    return out if dtype is None else out.astype(dtype)

  def __getitem__(self, idx) -> np.ndarray:
    if idx is None:
      return RangedTensor(self._entry, self._counter, self._perm, self._lead + 1, self._cache)
    idx = idx if isinstance(idx, tuple) else (idx,)
    idx = idx + (slice(None),) * (self.ndim - len(idx))
    spans, squeeze = [], []
    for axis, (i, n) in enumerate(zip(idx, self.shape)):
      if isinstance(i, (int, np.integer)):
        i = int(i) + n if i < 0 else int(i)
        squeeze.append(axis)
        i = slice(i, i + 1)
      start, stop, step = i.indices(n)
      if step != 1:
        raise NotImplementedError(f"{self._entry.file}: strided reads")
      spans.append((start, max(start, stop)))
    stored = [None] * len(self._perm)
    for ours, theirs in enumerate(self._perm):
      stored[theirs] = spans[self._lead + ours]
    block = self._read(tuple(stored)).transpose(self._perm)
    block = block.reshape(tuple(b - a for a, b in spans[:self._lead]) + block.shape)
    return block.squeeze(tuple(squeeze)) if squeeze else block

  def _read(self, spans: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The block `spans` (per stored axis) of the stored tensor."""
    if spans in self._cache:
      return self._cache[spans]
    e, item = self._entry, self._entry.dtype.itemsize
    lengths = tuple(b - a for a, b in spans)
    if 0 in lengths:
      return np.empty(lengths, e.dtype)
    shape = e.shape or (1,)  # a 0-d tensor is one element
    spans = spans or ((0, 1),)
    # the last axis not read whole: below it every run is contiguous
    j = max((k for k, (span, n) in enumerate(zip(spans, shape)) if span != (0, n)), default=0)
    strides = [int(np.prod(shape[k + 1:], dtype=np.int64)) * item for k in range(len(shape))]
    run = (spans[j][1] - spans[j][0]) * strides[j]
    starts = [e.start + sum(i * s for i, s in zip(lead, strides)) + spans[j][0] * strides[j]
              for lead in itertools.product(*(range(a, b) for a, b in spans[:j]))]
    groups = []  # (first byte, last byte, [run starts]) of each request
    for s0 in starts:
      if groups and s0 - groups[-1][1] < MERGE_GAP:
        groups[-1][1] = s0 + run
        groups[-1][2].append(s0)
      else:
        groups.append([s0, s0 + run, [s0]])
    data = paths.read_ranges(e.file, [g[0] for g in groups], [g[1] for g in groups])
    self._counter[0] += sum(len(d) for d in data)
    runs = [d[s0 - g0:s0 - g0 + run] for (g0, _, members), d in zip(groups, data) for s0 in members]
    out = np.frombuffer(b"".join(runs), e.dtype).reshape(lengths)
    self._cache[spans] = out
    return out


class SafetensorsReader:
  """Lazy name -> array over one or more safetensors files: a read-only memory map of a local file, a
  `RangedTensor` of a file in a bucket (`bytes_read` counts what was fetched)."""

  def __init__(self, files: Iterable[str]):
    self._entries: dict[str, _Entry] = {}
    self._maps: dict[str, np.memmap] = {}
    self._counter = [0]
    self.metadata: dict[str, str] = {}  # the files' `__metadata__`, merged
    for path in files:
      if not paths.isfile(path):
        raise CheckpointError(f"{path}: safetensors file not found")
      entries, metadata = _read_header(path)
      self.metadata.update(metadata)
      for name, entry in entries.items():
        if name in self._entries:
          raise CheckpointError(f"{path}: tensor {name!r} also stored in {self._entries[name].file}")
        self._entries[name] = entry

  @property
  def bytes_read(self) -> int:
    """Tensor bytes fetched from a bucket so far (headers excluded; local files are memory-mapped, not counted)."""
    return self._counter[0]

  @classmethod
  def from_folder(cls, folder: str) -> "SafetensorsReader":
    """A diffusers/transformers weight folder: an index json naming shards, or every *.safetensors."""
    if not paths.isdir(folder):
      raise CheckpointError(f"{folder}: checkpoint folder not found")
    names = paths.listdir(folder)
    indexes = [f for f in names if f.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
      raise CheckpointError(f"{folder}: several safetensors index files: {indexes}")
    if indexes:
      index = paths.join(folder, indexes[0])
      weight_map = _read_json(index).get("weight_map")
      if not (isinstance(weight_map, dict) and weight_map
              and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty mapping of tensor names to shard file "
                              f"names, got {weight_map!r:.200}")
      files = sorted({paths.join(folder, v) for v in weight_map.values()})
      absent = [f for f in files if not paths.isfile(f)]
      if absent:
        raise CheckpointError(f"{index}: weight_map names shard files that do not exist: {absent}")
      reader = cls(files)
      listed, stored = set(weight_map), set(reader.names())
      if listed != stored:
        raise CheckpointError(
            f"{index}: index and shards disagree; listed but not stored: "
            f"{sorted(listed - stored)[:20]}, stored but not listed: {sorted(stored - listed)[:20]}")
      return reader
    files = [paths.join(folder, f) for f in names if f.endswith(".safetensors")]
    if not files:
      raise CheckpointError(f"{folder}: no *.safetensors files and no index json")
    return cls(files)

  def names(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name].shape

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def read(self, name: str) -> "np.ndarray | RangedTensor":
    """A lazy array: only what is sliced gets read."""
    e = self._entries[name]
    if paths.is_url(e.file):
      return RangedTensor(e, self._counter)
    if e.file not in self._maps:
      self._maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="r")
    buf = self._maps[e.file][e.start:e.end]
    return buf.view(e.dtype).reshape(e.shape)


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
  """Write one safetensors file (no torch): used by export and by tests."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.ascontiguousarray(np.asarray(tensors[name]))
    if a.dtype not in _DTYPE_NAMES:
      raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
    header[name] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)

  def write(f):
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in arrays:
      f.write(a.tobytes())

  if paths.is_url(path):  # an object appears whole when its upload ends
    with paths.open(path, "wb") as f:
      write(f)
    return
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


# Layout changes between a reference tensor and ours.
def _identity(a):
  return a


def _linear(a):  # torch (out, in) -> ours (in, out)
  return a.T


def _conv2d(a):  # torch (O, I, kh, kw) -> ours (kh, kw, I, O)
  return a.transpose(2, 3, 1, 0)


def _lora(a):  # peft lora_A (r, in) / lora_B (out, r) -> ours (1, in, r) / (1, r, out)
  return a.T[None]


def _conv3d(a):  # torch (O, I, kt, kh, kw) -> ours (kt, kh, kw, I, O)
  return a.transpose(2, 3, 4, 1, 0)


LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": _identity,
    "linear": _linear,
    "conv2d": _conv2d,
    "lora": _lora,
    "conv3d": _conv3d,
}


@dataclasses.dataclass(frozen=True)
class WeightRule:
  """`ours` is a regex over our dotted parameter path; `theirs` its reference name template."""

  ours: str
  theirs: str
  layout: str = "identity"


def path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def reference_name(path: str, table: Iterable[WeightRule]) -> tuple[str, str]:
  for rule in table:
    m = re.fullmatch(rule.ours, path)
    if m:
      return m.expand(rule.theirs), rule.layout
  raise CheckpointError(f"parameter {path!r} has no rule in the weight table")


def tensor_entries(state) -> list[tuple[str, nnx.Variable, int | None]]:
  """(our tensor path, Variable, block) for every tensor of a state: a stacked Variable (`layers.StackedBlocks`)
  holds one tensor per block, named with the block's index (`layers.layer_paths`); block is None otherwise."""
  out = []
  for path, var in nnx.to_flat_state(state):
    if STACKED in path:
      out += [(path_str(p), var, i) for i, p in enumerate(layer_paths(path, var.get_value().shape[0]))]
    else:
      out.append((path_str(path), var, None))
  return out


def reference_shapes(abstract_state, table: Iterable[WeightRule]) -> dict[str, tuple[tuple[int, ...], str, str]]:
  """{reference name: (reference shape, our tensor path, layout)} for every tensor of the state."""
  out = {}
  for ours, var, block in tensor_entries(abstract_state):
    theirs, layout = reference_name(ours, table)
    shape = tuple(var.get_value().shape)[0 if block is None else 1:]
    ref_shape = _invert_shape(layout, shape)
    if theirs in out:
      raise CheckpointError(f"weight table maps both {out[theirs][1]!r} and {ours!r} to {theirs!r}")
    out[theirs] = (ref_shape, ours, layout)
  return out


# Ours -> reference layout, the inverse of LAYOUTS (used by export).
REFERENCE_LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": _identity,
    "linear": _linear,
    "conv2d": lambda a: a.transpose(3, 2, 0, 1),
    "lora": lambda a: a[0].T,
    "conv3d": lambda a: a.transpose(4, 3, 0, 1, 2),
}


def to_reference(state, table: Iterable[WeightRule]) -> dict[str, np.ndarray]:
  """{reference name: host array in the reference layout} for every tensor of a concrete state."""
  table = tuple(table)
  out = {}
  for ours, var, block in tensor_entries(state):
    name, layout = reference_name(ours, table)
    value = var.get_value() if block is None else var.get_value()[block]
    out[name] = np.ascontiguousarray(REFERENCE_LAYOUTS[layout](np.asarray(jax.device_get(value))))
  return out


def _invert_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if layout == "identity":
    return shape
  if layout == "linear":
    return shape[::-1]
  if layout == "conv2d":  # ours (kh, kw, I, O) -> torch (O, I, kh, kw)
    return (shape[3], shape[2], shape[0], shape[1])
  if layout == "conv3d":  # ours (kt, kh, kw, I, O) -> torch (O, I, kt, kh, kw)
    return (shape[4], shape[3], shape[0], shape[1], shape[2])
  if layout == "lora":  # ours (n, x, y) -> torch (y, x), one adapter only
    if shape[0] != 1:
      raise CheckpointError(f"a LoRA file holds one adapter; the model slot has {shape[0]}")
    return (shape[2], shape[1])
  raise KeyError(layout)


def load_state(abstract_state, reader: SafetensorsReader, table: Iterable[WeightRule], *, source: str,
               mesh=None, rules=shd.DEFAULT_RULES, dtype=None, strip_prefixes: tuple[str, ...] = (),
               allow_unused: Callable[[str], bool] | None = None):
  """Fill an abstract nnx.State from a checkpoint, tensor by tensor.

  `strip_prefixes` lets one table serve several naming schemes (e.g. `transformer.`).
  Raises CheckpointError listing every missing, unexpected, mis-shaped and integer/boolean-for-float tensor.
  """
  table = tuple(table)
  expected = reference_shapes(abstract_state, table)
  stored: dict[str, str] = {}
  for name in reader.names():
    key = name
    for p in strip_prefixes:
      if key.startswith(p):
        key = key[len(p):]
        break
    stored[key] = name
  missing = sorted(set(expected) - set(stored))
  unexpected = sorted(k for k in set(stored) - set(expected) if not (allow_unused and allow_unused(k)))
  misshaped = sorted(f"{k}: checkpoint {reader.shape(stored[k])}, model expects {expected[k][0]}"
                     for k in set(expected) & set(stored) if tuple(reader.shape(stored[k])) != expected[k][0])
  # an integer or boolean tensor in a float parameter is a wrong file, not a value to cast
  floats = {ours for ours, v, _ in tensor_entries(abstract_state)
            if jnp.issubdtype(jnp.dtype(dtype or v.get_value().dtype), jnp.floating)}
  not_float = sorted(f"{k}: {reader.read(stored[k]).dtype}" for k in set(expected) & set(stored)
                     if expected[k][1] in floats and not jnp.issubdtype(reader.read(stored[k]).dtype, jnp.floating))
  if missing or unexpected or misshaped or not_float:
    lines = [f"{source}: checkpoint does not match the model"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                         ("not floating point", not_float)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:50]) + (" ..." if len(items) > 50 else ""))
    raise CheckpointError("\n".join(lines))

  by_ours = {v[1]: (k, v[2]) for k, v in expected.items()}

  def host(ours: str) -> np.ndarray:  # a checkpoint tensor in our layout, still memory-mapped
    theirs, layout = by_ours[ours]
    return LAYOUTS[layout](reader.read(stored[theirs]))

  def fill(path, var):
    target = var.get_value()
    want = jnp.dtype(dtype or target.dtype)
    if STACKED in path:  # one checkpoint tensor per block, stacked on the leading axis
      blocks = [host(path_str(p)) for p in layer_paths(path, target.shape[0])]

      def read(idx):  # this shard of every block, written straight into one array of the target dtype
        chosen = blocks[idx[0]]
        out = np.empty((len(chosen),) + chosen[0][idx[1:]].shape, want)
        for i, b in enumerate(chosen):
          out[i] = b[idx[1:]]
        return out
    else:
      tensor = host(path_str(path))
      read = lambda idx: np.asarray(tensor[idx]).astype(want)
    if mesh is None:
      sharding = SingleDeviceSharding(jax.devices()[0])
    else:
      sharding = NamedSharding(mesh, shd.variable_spec(var, rules, mesh))
    return var.replace(jax.make_array_from_callback(target.shape, sharding, read))

  flat = [(path, fill(path, var)) for path, var in nnx.to_flat_state(abstract_state)]
  return nnx.from_flat_state(flat)


def model_folder(folder: str, component: str) -> str:
  """A diffusers pipeline folder's `component/` (transformer, vae, text_encoder, ...) when it has a
  config.json, else `folder` itself (the model folder given directly)."""
  sub = paths.join(folder, component)
  return sub if paths.isfile(paths.join(sub, "config.json")) else folder


def _describe(hint) -> str:
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return " or ".join(_describe(a) for a in typing.get_args(hint))
  if typing.get_origin(hint) is tuple:
    return f"a list of {_describe(typing.get_args(hint)[0])}"
  return {int: "int", float: "float", bool: "bool", str: "str", type(None): "null"}[hint]


def _typed(value, hint):
  """`value` as the field annotation `hint` says, or TypeError: bool is not an int, an int is a float, a list
  is a `tuple[X, ...]`."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    for arm in typing.get_args(hint):
      try:
        return _typed(value, arm)
      except TypeError:
        pass
    raise TypeError
  if typing.get_origin(hint) is tuple:
    if not isinstance(value, (list, tuple)):
      raise TypeError
    return tuple(_typed(v, typing.get_args(hint)[0]) for v in value)
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
    return value
  raise TypeError


class DiffusersConfig:
  """Mixin of a frozen dataclass config that a diffusers model's config.json describes: `_DIFFUSERS_KEYS` are read
  field by field (an absent one keeps our default, which is diffusers'), and written back with `_CLASS_NAME`."""

  _CLASS_NAME: typing.ClassVar[str]
  _DIFFUSERS_KEYS: typing.ClassVar[tuple[str, ...]]

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_diffusers_config(cls, config: dict, *, source: str = "config", **runtime):
    return cls(**config_fields(cls, config, cls._DIFFUSERS_KEYS, source, required=False), **runtime)

  def to_diffusers_config(self) -> dict:
    values = {k: getattr(self, k) for k in self._DIFFUSERS_KEYS}
    return {"_class_name": self._CLASS_NAME, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}


def config_fields(cls, config: Mapping, keys: Iterable[str], source: str, *, required: bool = True,
                  prefix: str = "") -> dict:
  """`keys` of a reference config as keyword arguments of the dataclass `cls`, each checked against its field's
  annotation, so a wrong type names the file and field instead of failing inside the model. With `required`
  every key must be there: the reference's defaults are another model size, so a missing key is an error
  naming them all, never a guess. `prefix` names the config section in messages."""
  missing = [prefix + k for k in keys if k not in config]
  if required and missing:
    raise CheckpointError(f"{source}: missing {missing}")
  hints = typing.get_type_hints(cls)
  out = {}
  for k in keys:
    if k in config:
      try:
        out[k] = _typed(config[k], hints[k])
      except TypeError:
        raise CheckpointError(f"{source}: field {prefix + k!r} must be {_describe(hints[k])}, "
                              f"got {config[k]!r:.80}") from None
  return out


def config_section(config: Mapping, key: str, source: str) -> dict:
  """A nested object of a reference config ({} when absent or null)."""
  section = config.get(key) or {}
  if not isinstance(section, dict):
    raise CheckpointError(f"{source}: field {key!r} must be an object, got {section!r:.80}")
  return section


def read_config(folder: str, name: str = "config.json") -> dict:
  path = paths.join(folder, name)
  if not paths.isfile(path):
    raise CheckpointError(f"{path}: config file not found")
  return _read_json(path)
