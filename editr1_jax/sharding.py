"""Logical axis names -> mesh axes.

Parameters carry their logical axes as Variable metadata (`logical_axes`); activations are
constrained with `constrain(x, axes)`. One rule table (it lives in the config) maps the names to the
mesh axes (data, fsdp, tensor), so the layout is declared once and changed in one place.
"""

import contextlib
import contextvars
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or tuple of mesh axes or None)
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),  # parameter input/output width: FSDP-sharded
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("seq", None),
    ("act_embed", None),  # activation width: replicated
    ("adapters", None),
    ("layers", None),  # the stacking axis of blocks run by a scan (layers.StackedBlocks): each chip holds every block
    ("lora_rank", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
)

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("editr1_mesh", default=None)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; -1 in one place takes the remaining devices."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = devices.size // known
  if math.prod(shape) != devices.size:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, {devices.size} available")
  return Mesh(devices.reshape(shape), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None] | None, rules=DEFAULT_RULES, shape=None, mesh=None) -> PartitionSpec:
  """Map logical names to a PartitionSpec.

  A mesh axis is used at most once per array (the first dimension claiming it wins); with `shape`
  and `mesh` given, mesh axes that do not divide a dimension are dropped for that dimension.
  """
  if axes is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; rules name {sorted(table)}")
    mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    chosen = []
    size = 1
    for ax in mesh_axes:
      if ax in used:
        continue
      if shape is not None and mesh is not None:
        if shape[dim] % (size * mesh.shape[ax]) != 0:
          continue
        size *= mesh.shape[ax]
      chosen.append(ax)
      used.add(ax)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def variable_spec(variable, rules=DEFAULT_RULES, mesh=None) -> PartitionSpec:
  axes = variable.get_metadata().get("logical_axes")
  value = variable.get_value()
  return logical_to_spec(axes, rules, shape=value.shape, mesh=mesh)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for every Variable of an (abstract or concrete) nnx.State."""
  return jax.tree.map(
      lambda v: NamedSharding(mesh, variable_spec(v, rules, mesh)),
      state,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def shard_state(state, mesh: Mesh, rules=DEFAULT_RULES):
  """Place a concrete nnx.State on the mesh as its logical axes say."""
  shardings = state_shardings(state, mesh, rules)
  return jax.tree.map(
      lambda v, s: v.replace(jax.device_put(v.get_value(), s)),
      state,
      shardings,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules=DEFAULT_RULES) -> Iterator[None]:
  """Activate `constrain` for code traced inside this block."""
  token = _ACTIVE.set(None if mesh is None else (mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
  """The mesh of the enclosing `use_mesh` block (None outside one)."""
  active = _ACTIVE.get()
  return None if active is None else active[0]


def active_rules():
  """The sharding rules of the enclosing `use_mesh` block (the defaults outside one)."""
  active = _ACTIVE.get()
  return DEFAULT_RULES if active is None else active[1]


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `use_mesh`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(axes, rules, shape=x.shape, mesh=mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) global array as one numpy array, the same on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def put_rows(x, mesh: Mesh | None, rules=DEFAULT_RULES, axes: Sequence[str | None] | None = None) -> jax.Array:
  """Host rows (identical on every process) -> a global array split over data x fsdp as far as the row count
  divides (`axes`: the logical axes of the leading dimensions, default ("batch",); the rest are not split);
  a plain device array without a mesh."""
  if mesh is None:
    return jnp.asarray(x)
  axes = ("batch",) if axes is None else tuple(axes)
  axes = axes + (None,) * (np.ndim(x) - len(axes))
  return jax.device_put(x, NamedSharding(mesh, logical_to_spec(axes, rules, np.shape(x), mesh)))


def put_tree(tree, axes_tree, mesh: Mesh | None, rules=DEFAULT_RULES):
  """`put_rows` leaf by leaf, each leaf with its logical axes from `axes_tree` (a pytree of tuples)."""
  leaves, treedef = jax.tree.flatten(tree)
  axes = treedef.flatten_up_to(axes_tree)
  return treedef.unflatten([put_rows(x, mesh, rules, a) for x, a in zip(leaves, axes)])


def _per_row(axes) -> bool:
  return bool(axes) and axes[0] == "batch"


def _map_rows(fn, tree, axes_tree):
  """fn on the per-row leaves of `tree` (first logical axis "batch"), shared leaves unchanged."""
  leaves, treedef = jax.tree.flatten(tree)
  leaf_axes = treedef.flatten_up_to(axes_tree)
  return treedef.unflatten([fn(x) if _per_row(a) else x for x, a in zip(leaves, leaf_axes)])


def tile_rows(tree, axes_tree, n: int):
  """The tree's rows repeated n times (the shared leaves as they are)."""
  return _map_rows(lambda x: jnp.concatenate([x] * n, axis=0), tree, axes_tree)


def host_rows(tree, axes_tree, indices):
  """The rows `indices` of a host tree (a family's condition), as host arrays."""
  indices = np.asarray(indices)
  return _map_rows(lambda x: np.asarray(x)[indices], tree, axes_tree)


def batch_width(mesh: Mesh | None) -> int:
  """How many ways a batch's rows split: data x fsdp (1 without a mesh)."""
  return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def abstract_rows(shape, dtype, mesh: Mesh, rules=DEFAULT_RULES, axes: Sequence[str | None] = ("batch",)):
  """A `jax.ShapeDtypeStruct` placed as `put_rows` would place such host rows (ahead-of-time compilation)."""
  axes = tuple(axes) + (None,) * (len(shape) - len(axes))
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=NamedSharding(mesh, logical_to_spec(
      axes, rules, tuple(shape), mesh)))
