"""The one rollout path: training rollouts, evaluation and `launch/edit.py` all sample through `generate`.

A row's result depends only on its condition and its key: the initial noise comes from fold_in(key, 0),
the SDE solver's per-step noise from fold_in(key, 1), and rows run in fixed-size chunks (`chunks`).
"""

import logging
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from editr1_jax import chunks, metrics, preemption, sampling
from editr1_jax import sharding as shd

_LOG = logging.getLogger(__name__)


@flax.struct.dataclass
class Rollouts:
  """What an epoch keeps of its rollouts: the final latents (device), the edited and source images and the
  condition rows (host), and the schedule they were sampled on."""

  x0: jax.Array  # (n, L, C)
  edits: np.ndarray  # (n, H, W, 3) in ~[-1, 1]
  sources: np.ndarray  # (n, H, W, 3) in [-1, 1]
  cond: Any  # the family's condition, n host rows
  sigmas: np.ndarray  # (N + 1,), ends in 0


class Sampler:
  """Jitted sampling of a family's network: `model_fn(states)` rebuilds the network from parameter states
  (a policy's (params, frozen), or a plain model's state)."""

  def __init__(self, family, model_fn: Callable, *, noise_level: float = 0.7,
               progress: Callable[[jax.Array], None] | None = None):
    self.family, self.model_fn, self.noise_level, self.progress = family, model_fn, noise_level, progress
    self._sample = jax.jit(self._sample_fn, static_argnames=("solver",))

  def _sample_fn(self, states, cond, noise, sigmas, keys, *, solver):
    model = self.model_fn(states)
    with shd.use_mesh(self.family.mesh, self.family.rules):
      def velocity(z, sigma):
        v = self.family.velocity(model, z, jnp.broadcast_to(sigma, (z.shape[0],)), cond)
        if self.progress is not None:  # depends on v, so it fires once the step's network call is done
          jax.debug.callback(lambda s, _: self.progress(s), sigma, v[0, 0, 0])
        return v
      return sampling.sample(velocity, noise, sigmas, solver=solver, keys=keys, noise_level=self.noise_level).x0

  def __call__(self, states, cond, keys: jax.Array, sigmas, *, grid, solver: str, noise=None) -> jax.Array:
    """x0 of the rows of `cond` (on the mesh), each from its key (or from the given initial `noise`)."""
    if noise is None:
      noise = sampling.initial_noise(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys), self.family.noise_shape(grid))
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    return self._sample(states, cond, noise, jnp.asarray(sigmas, jnp.float32), step_keys, solver=solver)

  def trace(self, states, cond, noise, sigmas, step_keys, *, solver: str):
    """The jitted sampling call traced for (abstract, sharded) inputs, to lower and compile without running it
    (`editr1_jax.plan`): `noise` the initial noise, `step_keys` the per-row solver keys (`__call__` derives both
    from the row keys)."""
    return self._sample.trace(states, cond, noise, sigmas, step_keys, solver=solver)


def generate(sampler: Sampler, states, cond, keys: np.ndarray, *, grid: tuple[int, int], num_steps: int,
             solver: str, chunk: int, desc: str | None = None,
             noise: np.ndarray | None = None) -> tuple[jax.Array, np.ndarray, np.ndarray]:
  """Rollouts of the host condition rows `cond` with host key data `keys` (n,): (x0 (device), decoded images
  (host), sigmas), sampled in fixed-size chunks of `chunk` rows. `noise` (n, ...) replaces the keys' initial
  noise (comparisons against a reference that takes explicit latents)."""
  from tqdm import tqdm
  family = sampler.family
  axes = family.condition_axes(cond)
  sigmas = family.sigmas(num_steps, grid)
  x0_parts, images = [], []
  parts = list(chunks.padded_chunks(len(keys), chunk))
  for idx, real in tqdm(parts, desc=desc, disable=desc is None, leave=False):
    preemption.check("before a rollout chunk")
    rows = shd.put_tree(shd.host_rows(cond, axes, idx), axes, family.mesh, family.rules)
    row_keys = jax.random.wrap_key_data(shd.put_rows(keys[idx], family.mesh, family.rules))
    row_noise = None if noise is None else shd.put_rows(np.asarray(noise, np.float32)[idx], family.mesh, family.rules)
    x0 = sampler(states, rows, row_keys, sigmas, grid=grid, solver=solver, noise=row_noise)
    x0_parts.append(x0[:real])
    images.append(family.decode(x0, grid)[:real])
  return jnp.concatenate(x0_parts), np.concatenate(images), sigmas


def collect(family, sampler: Sampler, states, records: list[dict], keys: np.ndarray, *, resolution: int,
            num_steps: int, solver: str, guidance: float, chunk: int, desc: str | None = None) -> Rollouts:
  """Rollouts of `states` (e.g. the old policy's (params, frozen)) for `records`, one per row with its key."""
  ids = list(dict.fromkeys(r["id"] for r in records))  # each record's source and condition computed once
  by_id = {r["id"]: r for r in records}
  sources = np.stack([family.training_image(by_id[i]["image"], resolution) for i in ids])
  grid = family.grid(resolution, resolution)
  cond = family.condition(sources, [by_id[i]["prompt"] for i in ids], grid=grid, guidance=guidance)
  where = np.array([ids.index(r["id"]) for r in records])
  cond = shd.host_rows(cond, family.condition_axes(cond), where)
  x0, edits, sigmas = generate(sampler, states, cond, keys, grid=grid, num_steps=num_steps, solver=solver,
                               chunk=chunk, desc=desc)
  return Rollouts(x0=x0, edits=edits, sources=sources[where], cond=cond, sigmas=sigmas)


def score(reward, result: Rollouts, records: list[dict], progress: str | None = None):
  """(scores, valid): an edit that decoded to non-finite pixels is masked (NaN, invalid), never judged."""
  edits = result.edits
  finite = np.isfinite(edits).reshape(len(edits), -1).all(axis=1)
  if not finite.all():
    _LOG.warning("%d of %d edits decoded to non-finite pixels: their rewards are masked", (~finite).sum(), len(edits))
  edits = np.where(finite[:, None, None, None], edits, 0.0)
  scored = reward.score(list(metrics.to_uint8(result.sources)), list(metrics.to_uint8(edits)), records,
                        progress=progress)
  valid = scored.valid & finite
  return np.where(valid, scored.scores, np.nan).astype(np.float32), valid
