"""Flow-matching schedules and solvers (docs/METHOD.md section 3).

Convention: x_t = (1 - t) x0 + t eps, t = 1 is pure noise, the network predicts v = eps - x0.
A solver integrates `v = velocity_fn(z, sigma)` over a sigma list ending in 0 with one `lax.scan`;
it keeps only the running latent (and, for DPM-Solver++(2M), the previous x0 estimate), never the
trajectory. All schedule and solver arithmetic runs in float32 whatever the model's compute dtype.
"""

import dataclasses
import functools
import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (z (B, L, C), sigma ()) -> v (B, L, C)
SOLVERS = ("euler", "sde", "dpm2")


@dataclasses.dataclass(frozen=True)
class ShiftConfig:
  """What a FlowMatchEulerDiscreteScheduler folder says about the sigmas (docs/METHOD.md section 3).

  Dynamic shifting (FLUX, Qwen-Image): mu grows linearly with the image token count and the base sigmas are
  shifted by e^mu ("exponential") or mu ("linear"); otherwise a fixed `shift`. `shift_terminal` then stretches
  the schedule so its last non-zero sigma is that value (Qwen-Image: 0.02).
  """

  base_len: int = 256
  max_len: int = 4096
  base_shift: float = 0.5
  max_shift: float = 1.15
  dynamic: bool = True
  shift: float = 1.0  # used only when not dynamic
  time_shift_type: str = "exponential"
  shift_terminal: float | None = None

  def __post_init__(self):
    if self.time_shift_type not in ("exponential", "linear"):
      raise ValueError(f"time_shift_type must be exponential or linear, got {self.time_shift_type!r}")
    if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
      raise ValueError(f"shift_terminal must be in [0, 1), got {self.shift_terminal}")

  def mu(self, image_tokens: int) -> float:
    m = (self.max_shift - self.base_shift) / (self.max_len - self.base_len)
    return image_tokens * m + self.base_shift - m * self.base_len

  def shifted(self, base: np.ndarray, image_tokens: int) -> np.ndarray:
    """Base sigmas (descending, in (0, 1]) -> the scheduler's sigmas, before the final 0 is appended."""
    if self.dynamic:
      mu = self.mu(image_tokens)
      scale = math.exp(mu) if self.time_shift_type == "exponential" else mu  # a Python float: keeps float32
      sigmas = scale / (scale + (1.0 / base - 1.0))
    else:
      sigmas = self.shift * base / (1.0 + (self.shift - 1.0) * base)
    if self.shift_terminal:  # diffusers skips a 0 / None terminal the same way
      one_minus = 1.0 - sigmas
      sigmas = 1.0 - one_minus / (one_minus[-1] / (1.0 - self.shift_terminal))
    return sigmas

  @classmethod
  def from_diffusers_config(cls, config: dict, source: str = "scheduler config") -> "ShiftConfig":
    """From a FlowMatchEulerDiscreteScheduler `scheduler_config.json`: every field that changes the sigmas is
    read; the ones we do not compute (Karras / exponential / beta spacing, inverted or stochastic sampling) are an
    error naming them, never a silent difference."""
    changing = {k: config[k] for k, default in _UNSUPPORTED_DEFAULTS.items() if config.get(k, default) != default}
    if changing:
      raise ValueError(f"{source}: {changing} change the schedule and are not supported "
                       f"(expected {_UNSUPPORTED_DEFAULTS})")
    kind = config.get("time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
      raise ValueError(f"{source}: time_shift_type {kind!r} is not supported (exponential, linear)")
    fields = {"base_image_seq_len": "base_len", "max_image_seq_len": "max_len", "base_shift": "base_shift",
              "max_shift": "max_shift", "shift": "shift", "shift_terminal": "shift_terminal"}
    kw = {}
    for key, name in fields.items():
      value = config.get(key, getattr(cls, name))
      if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{source}: {key} must be a number, got {value!r}")
      kw[name] = value
    return cls(dynamic=bool(config.get("use_dynamic_shifting", False)), time_shift_type=kind, **kw)


FLUX_SHIFT = ShiftConfig()
# Fields of diffusers' FlowMatchEulerDiscreteScheduler config that alter the sigmas in ways we do not compute, at
# their defaults (FLUX.1 and Qwen-Image folders ship these values or leave them out).
_UNSUPPORTED_DEFAULTS = {"invert_sigmas": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                         "use_beta_sigmas": False, "stochastic_sampling": False}


def shifted_sigmas(num_steps: int, image_tokens: int, shift: ShiftConfig = FLUX_SHIFT) -> np.ndarray:
  """(num_steps + 1,) float32 sigmas from 1 down to 0: linspace(1, 1/N, N) shifted, then 0; equal to
  `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace, mu=mu(L))` as the FLUX and Qwen pipelines call
  it, whose arithmetic is float32 (so is ours)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be at least 1, got {num_steps}")
  base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
  return np.append(shift.shifted(base, image_tokens), 0.0).astype(np.float32)


def true_cfg(positive: jax.Array, negative: jax.Array, scale: jax.Array) -> jax.Array:
  """Classifier-free guidance as Qwen-Image pipelines apply it: v_neg + s (v_pos - v_neg), rescaled token by
  token to the norm of v_pos (over the last axis). `scale` is (B,); norms in float32."""
  p, n = positive.astype(jnp.float32), negative.astype(jnp.float32)
  combined = n + scale.astype(jnp.float32)[:, None, None] * (p - n)
  ratio = jnp.linalg.norm(p, axis=-1, keepdims=True) / jnp.linalg.norm(combined, axis=-1, keepdims=True)
  return (combined * ratio).astype(positive.dtype)


# --------------------------------------------------------------------------------------------------
def initial_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """One standard normal latent of `shape` per key: a sample's noise does not depend on its batch."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _velocity(velocity_fn: VelocityFn, z: jax.Array, sigma: jax.Array) -> jax.Array:
  return velocity_fn(z, sigma).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("velocity_fn",))
def euler(velocity_fn: VelocityFn, z: jax.Array, sigmas: jax.Array) -> jax.Array:
  """ODE Euler: z <- z + (sigma_next - sigma) v."""
  sigmas = jnp.asarray(sigmas, jnp.float32)

  def step(z, pair):
    s, t = pair
    return z + (t - s) * _velocity(velocity_fn, z, s), None

  z, _ = jax.lax.scan(step, z.astype(jnp.float32), (sigmas[:-1], sigmas[1:]))
  return z


@functools.partial(jax.jit, static_argnames=("velocity_fn",))
def flow_sde(velocity_fn: VelocityFn, z: jax.Array, sigmas: jax.Array, keys: jax.Array,
             noise_level: float | jax.Array) -> jax.Array:
  """Flow SDE with noise level a; step i of row b draws its noise from fold_in(keys[b], i).

  s = a sqrt(sigma / (1 - sigma)) (at sigma = 1 the second sigma replaces sigma in the denominator),
  mean = z (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt, z_next = mean + s sqrt(-dt) eps.
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  a = jnp.asarray(noise_level, jnp.float32)

  def step(z, inputs):
    i, s, t = inputs
    dt = t - s
    std = a * jnp.sqrt(s / (1.0 - jnp.where(s == 1.0, sigmas[1], s)))
    eps = initial_noise(jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), z.shape[1:])
    v = _velocity(velocity_fn, z, s)
    mean = z * (1.0 + std ** 2 * dt / (2.0 * s)) + v * (1.0 + std ** 2 * (1.0 - s) / (2.0 * s)) * dt
    return mean + std * jnp.sqrt(-dt) * eps, None

  n = sigmas.shape[0] - 1
  z, _ = jax.lax.scan(step, z.astype(jnp.float32), (jnp.arange(n), sigmas[:-1], sigmas[1:]))
  return z


def dpm2m_coefficients(sigmas: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per step i (sigma s -> t): z_next = c_z z + c_x x0_i + c_d (x0_i - x0_{i-1}).

  First order (DDIM, eta 0): c_z = t / s, c_x = (1 - t) - t (1 - s) / s, which is also DPM-Solver++'s
  first-order term alpha_t (1 - e^-h). Second order adds D1 = (x0_i - x0_{i-1}) / r with r = h_prev / h,
  i.e. c_d = c_x h / (2 h_prev). It is used on the middle steps only, and not after a step that started at
  sigma = 1, where lambda = -inf makes r infinite and the term zero. Every log is taken of a value inside
  (0, 1): the other entries are replaced by a placeholder before the log, so nothing is ever inf or NaN.
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  s, t = sigmas[:-1], sigmas[1:]
  prev = jnp.concatenate([s[:1], s[:-1]])
  i = jnp.arange(s.shape[0])
  c_z = t / s
  c_x = (1.0 - t) - t * (1.0 - s) / s
  second = (i > 0) & (i < s.shape[0] - 1) & (prev < 1.0)

  def lam(x, placeholder):
    x = jnp.where(second, x, placeholder)
    return jnp.log1p(-x) - jnp.log(x)

  h = lam(t, 0.25) - lam(s, 0.5)
  h_prev = lam(s, 0.5) - lam(prev, 0.75)
  c_d = jnp.where(second, 0.5 * c_x * h / h_prev, 0.0)
  return c_z, c_x, c_d


@functools.partial(jax.jit, static_argnames=("velocity_fn",))
def dpm_solver_2m(velocity_fn: VelocityFn, z: jax.Array, sigmas: jax.Array) -> jax.Array:
  """Deterministic DPM-Solver++(2M) on x0 = z - sigma v; DDIM first and last steps (the last lands on x0)."""
  sigmas = jnp.asarray(sigmas, jnp.float32)
  z = z.astype(jnp.float32)

  def step(carry, inputs):
    z, x0_prev = carry
    s, c_z, c_x, c_d = inputs
    x0 = z - s * _velocity(velocity_fn, z, s)
    return (c_z * z + c_x * x0 + c_d * (x0 - x0_prev), x0), None

  (z, _), _ = jax.lax.scan(step, (z, jnp.zeros_like(z)), (sigmas[:-1],) + dpm2m_coefficients(sigmas))
  return z


# --------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class Rollout:
  """What training needs from a rollout: the final clean latent and the schedule it was sampled on."""

  x0: jax.Array  # (B, L, C) float32
  sigmas: jax.Array  # (N + 1,) float32, ends in 0


def sample(velocity_fn: VelocityFn, noise: jax.Array, sigmas, *, solver: str = "dpm2", keys: jax.Array | None = None,
           noise_level: float = 0.7) -> Rollout:
  """Integrate from `noise` (B, L, C) at sigmas[0] to sigmas[-1] = 0 with the named solver."""
  sigmas = jnp.asarray(sigmas, jnp.float32)
  if solver == "euler":
    x0 = euler(velocity_fn, noise, sigmas)
  elif solver == "dpm2":
    x0 = dpm_solver_2m(velocity_fn, noise, sigmas)
  elif solver == "sde":
    if keys is None:
      raise ValueError("the 'sde' solver draws fresh noise every step: pass one key per row in `keys`")
    x0 = flow_sde(velocity_fn, noise, sigmas, keys, noise_level)
  else:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
  return Rollout(x0, sigmas)
