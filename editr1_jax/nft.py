"""The DiffusionNFT loss and its pure, sharded train step (docs/METHOD.md sections 6 and 7).

One epoch of training is: `accumulate` once per micro-batch of kept rollouts (each call runs the
T = int(N * timestep_fraction) training timesteps of every sample), then `apply` (one optimizer
step on the mean gradient over every (sample, timestep) term of the epoch), then `update_old`.
`train_step` chains accumulate and apply for an epoch that is a single micro-batch.

The gradient is accumulated as a sum over terms and divided by their count in `apply`, so the
update is that of the section-6 loss with the whole epoch as its batch, whatever the micro-batching.
v_old and v_ref come from one no-grad call on a doubled batch (old adapter at scale 1, then at
scale 0 = the base model); v from the current adapter, with gradient. Loss math runs in float32.
"""

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from editr1_jax import sharding as shd
from editr1_jax.layers import AdapterRows, split_adapters

ADV_MODES = ("all", "positive", "negative", "binary", "zero")  # zero: the control run (no learning signal)
DECAY_SCHEDULES = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class NFTConfig:
  beta: float = 1.0  # NFT mixing coefficient between v and v_old (not the KL weight)
  kl_weight: float = 1e-4  # weight of the KL-to-reference term
  adv_clip: float = 5.0  # c: advantages are clipped to [-c, c]
  adv_mode: str = "all"  # one of ADV_MODES
  weight_floor: float = 1e-5  # lower bound of the adaptive weights
  timestep_fraction: float = 0.99  # T = int(N * fraction) training timesteps per sample
  learning_rate: float = 3e-4
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  weight_decay: float = 1e-4
  adam_eps: float = 1e-8
  max_grad_norm: float = 1.0
  decay_schedule: int = 1  # old-policy schedule, one of DECAY_SCHEDULES
  ema_max_decay: float = 0.9

  def __post_init__(self):
    if self.beta <= 0:
      raise ValueError(f"NFTConfig.beta must be positive (the loss divides by it), got {self.beta}")
    if self.adv_mode not in ADV_MODES:
      raise ValueError(f"NFTConfig.adv_mode must be one of {ADV_MODES}, got {self.adv_mode!r}")
    if self.decay_schedule not in DECAY_SCHEDULES:
      raise ValueError(f"NFTConfig.decay_schedule must be one of {DECAY_SCHEDULES}, got {self.decay_schedule!r}")
    if self.adv_clip <= 0:
      raise ValueError(f"NFTConfig.adv_clip must be positive, got {self.adv_clip}")

  def train_timesteps(self, num_steps: int) -> int:
    t = int(num_steps * self.timestep_fraction)
    if t < 1:
      raise ValueError(f"NFTConfig.timestep_fraction {self.timestep_fraction} of {num_steps} rollout steps "
                       f"leaves no training timestep")
    return t


# --------------------------------------------------------------------------------------------------
# The loss
def advantage_to_r(advantages: jax.Array, cfg: NFTConfig) -> jax.Array:
  """Clipped advantage A_c (after the advantage mode) -> r = clip(A_c / c / 2 + 0.5, 0, 1)."""
  c = cfg.adv_clip
  a = jnp.clip(advantages.astype(jnp.float32), -c, c)
  if cfg.adv_mode == "positive":
    a = jnp.maximum(a, 0.0)
  elif cfg.adv_mode == "negative":
    a = jnp.minimum(a, 0.0)
  elif cfg.adv_mode == "binary":
    a = jnp.sign(a)
  elif cfg.adv_mode == "zero":
    a = jnp.zeros_like(a)
  return jnp.clip(a / c / 2.0 + 0.5, 0.0, 1.0)


def _sample_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _rows(x: jax.Array, like: jax.Array) -> jax.Array:
  return x.reshape(x.shape + (1,) * (like.ndim - 1))


def nft_terms(v, v_old, v_ref, x_t, x0, t, r, cfg: NFTConfig) -> dict[str, jax.Array]:
  """Per-sample (B,) policy, kl and total terms; the adaptive weights carry no gradient. Also `old_deviate`,
  mean((v - v_old)^2): how far the policy has moved from the rollout policy (the public code logs it)."""
  v, v_old, v_ref, x_t, x0 = (a.astype(jnp.float32) for a in (v, v_old, v_ref, x_t, x0))
  t = _rows(t.astype(jnp.float32), x0)
  v_old = jax.lax.stop_gradient(v_old)
  v_pos = cfg.beta * v + (1.0 - cfg.beta) * v_old
  v_neg = (1.0 + cfg.beta) * v_old - cfg.beta * v

  def weighted_error(v_mix):
    err = (x_t - t * v_mix) - x0
    weight = jax.lax.stop_gradient(jnp.maximum(_sample_mean(jnp.abs(err)), cfg.weight_floor))
    return _sample_mean(jnp.square(err)) / weight

  policy = (cfg.adv_clip / cfg.beta) * (r * weighted_error(v_pos) + (1.0 - r) * weighted_error(v_neg))
  kl = _sample_mean(jnp.square(v - jax.lax.stop_gradient(v_ref.astype(jnp.float32))))
  return dict(policy=policy, kl=kl, total=policy + cfg.kl_weight * kl, old_deviate=_sample_mean(jnp.square(v - v_old)))


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
  """sum_i m_i x_i; a masked-out row contributes exactly 0 (even if x_i is not finite)."""
  return jnp.sum(jnp.where(mask > 0, mask * x, 0.0))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """sum_i m_i x_i / sum_i m_i, and 0 (not NaN) when the mask is empty."""
  count = jnp.sum(mask)
  return jnp.where(count > 0, masked_sum(x, mask) / jnp.where(count > 0, count, 1.0), 0.0)


def nft_loss(v, v_old, v_ref, x_t, x0, t, advantages, mask, cfg: NFTConfig) -> tuple[jax.Array, dict]:
  """The section-6 loss of one batch: policy + kl_weight * kl, masked means over the batch."""
  terms = nft_terms(v, v_old, v_ref, x_t, x0, t, advantage_to_r(advantages, cfg), cfg)
  metrics = {k: masked_mean(x, mask) for k, x in terms.items()}
  return metrics["total"], metrics


# --------------------------------------------------------------------------------------------------
# Old policy and EMA schedules
def old_policy_decay(step: jax.Array, schedule: int) -> jax.Array:
  """eta of theta_old <- eta theta_old + (1 - eta) theta, after `step` optimizer steps."""
  step = jnp.asarray(step, jnp.float32)
  if schedule == 0:
    return jnp.zeros((), jnp.float32)
  if schedule == 1:
    return jnp.minimum(0.001 * step, 0.5)
  if schedule == 2:
    return jnp.where(step < 75, 0.0, jnp.minimum(0.0075 * (step - 75), 0.999))
  raise ValueError(f"old-policy decay schedule must be one of {DECAY_SCHEDULES}, got {schedule!r}")


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
  """min((1 + k) / (10 + k), max_decay), k = optimizer steps taken including this one."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum((1.0 + step) / (10.0 + step), max_decay)


def blend(average, current, decay: jax.Array):
  """decay * average + (1 - decay) * current, leaf by leaf, in each leaf's dtype."""
  return jax.tree.map(lambda a, c: (decay * a + (1.0 - decay) * c).astype(a.dtype), average, current)


# --------------------------------------------------------------------------------------------------
# The policy: which parameters make v, v_old and v_ref
@dataclasses.dataclass(frozen=True)
class Policy:
  """A family's velocity function and the parameters that make v, v_old and v_ref. LoRA: trainable =
  adapters, frozen = base. Full fine-tune: trainable = all parameters, frozen = the reference copy (a
  second network, so v_old and v_ref take two calls there)."""

  graphdef: Any
  full_finetune: bool
  no_adapters: Any  # the empty adapter state that completes a full-fine-tune merge
  velocity_fn: Callable  # (model, z, sigma, cond, adapters) -> v: the family's `velocity`
  cond_axes: Any  # the logical axes of the family's condition

  @classmethod
  def from_model(cls, model: nnx.Module, velocity_fn: Callable, cond_axes, full_finetune: bool = False):
    """(policy, trainable params, frozen params) of a family's transformer."""
    graphdef, adapters, base = split_adapters(model)
    if full_finetune:
      if jax.tree.leaves(adapters):
        raise ValueError("full fine-tuning trains every parameter: build the transformer without a LoraSpec")
      return cls(graphdef, True, adapters, velocity_fn, cond_axes), base, jax.tree.map(jnp.copy, base)
    if not jax.tree.leaves(adapters):
      raise ValueError("the transformer has no LoRA adapters: build it with a LoraSpec, or pass full_finetune=True")
    return cls(graphdef, False, None, velocity_fn, cond_axes), adapters, base

  def model(self, params, frozen):
    """The transformer with these parameters (adapters at full scale)."""
    if self.full_finetune:
      return nnx.merge(self.graphdef, self.no_adapters, params)
    return nnx.merge(self.graphdef, params, frozen)

  def velocity(self, params, frozen, x_t, t, cond) -> jax.Array:
    """v of the trainable parameters (the current adapter at full scale)."""
    return self.velocity_fn(self.model(params, frozen), x_t, t, cond)

  def old_and_reference(self, old, frozen, x_t, t, cond) -> tuple[jax.Array, jax.Array]:
    """(v_old, v_ref), no gradient: with LoRA one call on [rows | rows], old adapter at scale 1 then 0."""
    if self.full_finetune:
      v_old = self.velocity_fn(self.model(old, None), x_t, t, cond)
      v_ref = self.velocity_fn(self.model(frozen, None), x_t, t, cond)
    else:
      b = x_t.shape[0]
      rows = AdapterRows(jnp.zeros((2 * b,), jnp.int32), jnp.concatenate([jnp.ones((b,)), jnp.zeros((b,))]))
      both = self.velocity_fn(self.model(old, frozen), jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                              shd.tile_rows(cond, self.cond_axes, 2), rows)
      v_old, v_ref = both[:b], both[b:]
    return jax.lax.stop_gradient(v_old), jax.lax.stop_gradient(v_ref)


# --------------------------------------------------------------------------------------------------
# State, batch and the jitted step functions
@flax.struct.dataclass
class TrainState:
  params: Any  # trainable: adapter state (LoRA) or all parameters (full fine-tune)
  old_params: Any  # the rollout policy's version of `params`
  ema_params: Any
  opt_state: Any
  grad_sum: Any  # sum of per-term gradients since the last optimizer step
  term_count: jax.Array  # () float32: (sample, timestep) terms in grad_sum
  step: jax.Array  # () int32: optimizer steps taken


@flax.struct.dataclass
class TrainBatch:
  """One micro-batch of kept rollouts (rows with mask 0 are padding)."""

  x0: jax.Array  # (B, L, C) the rollouts' final clean latents
  cond: Any  # the family's condition, B rows
  sigmas: jax.Array  # (B, N) each rollout's timesteps (its sigma list without the final 0)
  advantages: jax.Array  # (B,)
  mask: jax.Array  # (B,) 1 for a kept rollout, 0 for padding
  index: jax.Array  # (B,) int32 the rollout's index in the epoch: its randomness is fold_in(key, index)

  @staticmethod
  def logical_axes(cond_axes) -> "TrainBatch":
    return TrainBatch(("batch", "seq", None), cond_axes, ("batch", None), ("batch",), ("batch",), ("batch",))


def gather_batch(x0: jax.Array, cond, cond_axes, sigmas, indices, advantages, mask) -> TrainBatch:
  """The micro-batch of rollouts `indices` (one row of `EpochAdvantages.micro_batches`) from an epoch's arrays:
  `x0` (n, L, C), `cond` a family's condition with n rows (`cond_axes` its logical axes), `sigmas` the
  rollouts' (N + 1,) schedule ending in 0."""
  sigmas = np.asarray(sigmas, np.float32)
  if sigmas.ndim != 1 or sigmas[-1] != 0:
    raise ValueError(f"sigmas must be the rollout's (N + 1,) schedule ending in 0, got shape {sigmas.shape}")
  indices = np.asarray(indices)
  take = lambda x: jnp.take(x, indices, axis=0)
  rows = shd.host_rows(cond, cond_axes, indices)  # host arrays: `NFTTrainer.place` puts them into their sharding
  steps = np.broadcast_to(sigmas[:-1], (len(indices), len(sigmas) - 1))
  return TrainBatch(x0=take(x0), cond=rows, sigmas=jnp.asarray(steps), advantages=jnp.asarray(advantages, jnp.float32),
                    mask=jnp.asarray(mask, jnp.float32), index=jnp.asarray(indices, jnp.int32))


def draw_terms(key: jax.Array, index: jax.Array, sigmas: jax.Array, latent_shape: tuple[int, ...],
               num_terms: int) -> tuple[jax.Array, jax.Array]:
  """The training timesteps (B, T) and noises (T, B, *latent_shape) of a micro-batch.

  Rollout i draws from fold_in(key, index[i]) alone, so its terms do not depend on how the epoch is cut
  into micro-batches or sharded: its own permutation of its rollout timesteps (the first T are used)
  and fresh noise per term.
  """
  n = sigmas.shape[1]

  def one(row_key, row_sigmas):
    perm_key, noise_key = jax.random.split(row_key)
    times = row_sigmas.astype(jnp.float32)[jax.random.permutation(perm_key, n)[:num_terms]]
    return times, jax.random.normal(noise_key, (num_terms,) + tuple(latent_shape), jnp.float32)

  times, noise = jax.vmap(one)(jax.vmap(lambda i: jax.random.fold_in(key, i))(index), sigmas)
  return times, jnp.moveaxis(noise, 1, 0)


def optimizer(cfg: NFTConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with a constant learning rate."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.max_grad_norm),
      optax.adamw(cfg.learning_rate, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay))


def tree_shardings(tree, mesh, rules=shd.DEFAULT_RULES):
  """NamedShardings for a pytree mixing nnx Variables (placed by their logical axes) and plain arrays (replicated)."""
  def one(x):
    spec = shd.variable_spec(x, rules, mesh) if isinstance(x, nnx.Variable) else PartitionSpec()
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class NFTTrainer:
  """The jitted train functions of one policy. With a mesh, every input and output has an explicit
  sharding (parameters, optimizer moments and accumulators by their logical axes, batch rows over
  data x fsdp) and the train state is donated."""

  def __init__(self, policy: Policy, cfg: NFTConfig, abstract_params, abstract_frozen, *, mesh=None,
               rules=shd.DEFAULT_RULES):
    self.policy, self.cfg, self.mesh, self.rules = policy, cfg, mesh, rules
    self.tx = optimizer(cfg)
    if mesh is not None:
      replicated = NamedSharding(mesh, PartitionSpec())
      self.shardings = dict(
          params=tree_shardings(abstract_params, mesh, rules), frozen=tree_shardings(abstract_frozen, mesh, rules),
          state=tree_shardings(jax.eval_shape(self._init, abstract_params), mesh, rules),
          batch=jax.tree.map(lambda axes: NamedSharding(mesh, shd.logical_to_spec(axes, rules)),
                             TrainBatch.logical_axes(policy.cond_axes), is_leaf=lambda x: isinstance(x, tuple)),
          key=replicated, metrics=replicated)
    step_io = dict(inputs=("state", "frozen", "batch", "key"), outputs=("state", "metrics"))
    self.init = self._jit(self._init, inputs=("params",), outputs="state")
    self.accumulate = self._jit(self._accumulate, **step_io, donate=True)
    self.apply = self._jit(self._apply, inputs=("state",), outputs=("state", "metrics"), donate=True)
    self.update_old = self._jit(self._update_old, inputs=("state",), outputs=("state", "metrics"), donate=True)
    self.drop_gradients = self._jit(self._drop_gradients, inputs=("state",), outputs="state", donate=True)
    self.train_step = self._jit(self._train_step, **step_io, donate=True)

  def _jit(self, fn, *, inputs, outputs, donate=False):
    """jax.jit with the named in/out shardings (none without a mesh), tracing under `use_mesh`."""
    def traced(*args):
      with shd.use_mesh(self.mesh, self.rules):
        return fn(*args)

    kw = dict(donate_argnums=(0,) if donate else ())
    if self.mesh is not None:
      def pick(names):
        return tuple(self.shardings[n] for n in names) if isinstance(names, tuple) else self.shardings[names]

      kw.update(in_shardings=pick(inputs), out_shardings=pick(outputs))
    return jax.jit(traced, **kw)

  def place(self, tree, kind: str):
    """Put host values on the mesh as `kind` ("params", "frozen", "batch") is sharded; a no-op without a mesh."""
    if self.mesh is None:
      return tree
    if kind == "batch":
      rows = shd.batch_width(self.mesh)
      if tree.x0.shape[0] % rows:
        raise ValueError(f"a micro-batch of {tree.x0.shape[0]} rows does not split over data x fsdp = {rows} devices")
    return jax.device_put(tree, self.shardings[kind])

  # pure functions --------------------------------------------------------------------------------
  def _init(self, params) -> TrainState:
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return TrainState(params=copy(params), old_params=copy(params), ema_params=copy(params),
                      opt_state=self.tx.init(params), grad_sum=jax.tree.map(jnp.zeros_like, params),
                      term_count=jnp.zeros((), jnp.float32), step=jnp.zeros((), jnp.int32))

  def _accumulate(self, state: TrainState, frozen, batch: TrainBatch, key: jax.Array):
    cfg, policy = self.cfg, self.policy
    num_terms = cfg.train_timesteps(batch.sigmas.shape[1])
    x0 = shd.constrain(batch.x0.astype(jnp.float32), ("batch", "seq", None))
    times, noise = draw_terms(key, batch.index, batch.sigmas, x0.shape[1:], num_terms)
    r = advantage_to_r(batch.advantages, cfg)
    mask = batch.mask.astype(jnp.float32)

    def term(carry, inputs):
      grad_sum, sums = carry
      t, eps = inputs
      x_t = shd.constrain(_rows(1.0 - t, x0) * x0 + _rows(t, x0) * eps, ("batch", "seq", None))
      v_old, v_ref = policy.old_and_reference(state.old_params, frozen, x_t, t, batch.cond)

      def loss(params):
        v = shd.constrain(policy.velocity(params, frozen, x_t, t, batch.cond), ("batch", "seq", None))
        terms = nft_terms(v, v_old, v_ref, x_t, x0, t, r, cfg)
        return masked_sum(terms["total"], mask), terms

      (_, terms), grad = jax.value_and_grad(loss, has_aux=True)(state.params)
      grad_sum = jax.tree.map(jnp.add, grad_sum, grad)
      terms["old_deviate_sq"] = jnp.square(terms["old_deviate"])
      sums = {k: sums[k] + masked_sum(terms[k], mask) for k in sums}
      return (grad_sum, sums), None

    zero = jnp.zeros((), jnp.float32)
    sums = dict(policy=zero, kl=zero, total=zero, old_deviate=zero, old_deviate_sq=zero)
    (grad_sum, sums), _ = jax.lax.scan(term, (state.grad_sum, sums), (times.T, noise))
    terms = jnp.sum(mask) * num_terms
    losses = {k: sums[k] for k in ("policy", "kl", "total")}
    metrics = {k: jnp.where(terms > 0, s / jnp.maximum(terms, 1.0), 0.0) for k, s in losses.items()}
    metrics["loss"] = metrics.pop("total")
    # sums, not means, so that the caller gets the epoch's mean and std of the per-term old_deviate exactly:
    # mean = sum(old_deviate_sum) / sum(terms), std = sqrt(sum(old_deviate_sq_sum) / sum(terms) - mean^2)
    metrics.update(terms=terms, kept_fraction=jnp.mean(mask), finite=_finite(losses) & _finite(grad_sum),
                   x0_norm=masked_mean(jnp.sqrt(_sample_mean(jnp.square(x0))), mask),
                   old_deviate_sum=sums["old_deviate"], old_deviate_sq_sum=sums["old_deviate_sq"])
    return state.replace(grad_sum=grad_sum, term_count=state.term_count + terms), metrics

  def _apply(self, state: TrainState):
    count = state.term_count
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), state.grad_sum)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(grad_norm) & _finite(params)
    applied = finite & (count > 0)
    step = state.step + applied.astype(jnp.int32)
    decay = ema_decay(step, self.cfg.ema_max_decay)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, old)
    new = state.replace(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                        ema_params=keep(blend(state.ema_params, params, decay), state.ema_params),
                        grad_sum=jax.tree.map(jnp.zeros_like, state.grad_sum), term_count=jnp.zeros_like(count),
                        step=step)
    return new, dict(grad_norm=grad_norm, finite=finite, applied=applied, ema_decay=decay, step=step)

  def _update_old(self, state: TrainState):
    eta = old_policy_decay(state.step, self.cfg.decay_schedule)
    return state.replace(old_params=blend(state.old_params, state.params, eta)), dict(old_decay=eta)

  def _drop_gradients(self, state: TrainState):
    """The state as the last optimizer step left it (gradient sum and term count zero): an epoch stopped before its
    step leaves the state of the epoch before."""
    return state.replace(grad_sum=jax.tree.map(jnp.zeros_like, state.grad_sum),
                         term_count=jnp.zeros_like(state.term_count))

  def _train_step(self, state: TrainState, frozen, batch: TrainBatch, key: jax.Array):
    state, metrics = self._accumulate(state, frozen, batch, key)
    state, applied = self._apply(state)
    return state, {**metrics, **applied}
