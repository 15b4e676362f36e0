"""The NFT loss against NumPy float64, the schedules against their formulas, and the train step:
its gradient equals the section-6 loss through three separate transformer calls, micro-batching does
not change it, and the step on a (2, 2, 2) mesh equals the single-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import float32_bound, max_rel_err

from editr1_jax import latents, nft, sampling
from editr1_jax.families import kontext
from editr1_jax import sharding as shd
from editr1_jax.layers import LoraSpec
from editr1_jax.models import flux


# --------------------------------------------------------------------------------------------------
# The loss, written again from docs/METHOD.md section 6 in float64, with its gradient by hand
def np_nft(v, v_old, v_ref, x_t, x0, t, adv, mask, *, beta, kl_weight, mode, c=5.0, floor=1e-5):
  v, v_old, v_ref, x_t, x0, t, adv, mask = (np.asarray(a, np.float64) for a in (v, v_old, v_ref, x_t, x0, t, adv, mask))
  a = np.clip(adv, -c, c)
  a = {"all": a, "positive": np.clip(a, 0, c), "negative": np.clip(a, -c, 0), "binary": np.sign(a),
       "zero": 0 * a}[mode]
  r = np.clip(a / c / 2 + 0.5, 0, 1)[:, None, None]
  d = np.prod(x0.shape[1:])
  tt = t[:, None, None]
  e_pos = x_t - tt * (beta * v + (1 - beta) * v_old) - x0
  e_neg = x_t - tt * ((1 + beta) * v_old - beta * v) - x0
  w_pos = np.maximum(np.abs(e_pos).mean(axis=(1, 2), keepdims=True), floor)
  w_neg = np.maximum(np.abs(e_neg).mean(axis=(1, 2), keepdims=True), floor)
  l_pos = (e_pos ** 2).mean(axis=(1, 2), keepdims=True) / w_pos
  l_neg = (e_neg ** 2).mean(axis=(1, 2), keepdims=True) / w_neg
  policy_i = (c / beta) * (r * l_pos + (1 - r) * l_neg)
  kl_i = ((v - v_ref) ** 2).mean(axis=(1, 2), keepdims=True)
  m = mask[:, None, None]
  if mask.sum() == 0:
    return 0.0, 0.0, 0.0, np.zeros_like(v)
  policy = (m * policy_i).sum() / mask.sum()
  kl = (m * kl_i).sum() / mask.sum()
  d_policy = (c / beta) * (r * 2 * e_pos * (-tt * beta) / (d * w_pos) + (1 - r) * 2 * e_neg * (tt * beta) / (d * w_neg))
  d_kl = 2 * (v - v_ref) / d
  grad = m * (d_policy + kl_weight * d_kl) / mask.sum()
  return policy + kl_weight * kl, policy, kl, grad


def loss_inputs(seed=0, b=6, l=8, ch=4):
  rng = np.random.default_rng(seed)
  x0 = rng.standard_normal((b, l, ch))
  t = rng.uniform(0.05, 1.0, b)
  eps = rng.standard_normal((b, l, ch))
  x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
  v_old = eps - x0 + 0.3 * rng.standard_normal((b, l, ch))
  v = v_old + 0.2 * rng.standard_normal((b, l, ch))
  v_ref = v_old + 0.2 * rng.standard_normal((b, l, ch))
  adv = np.array([-7.0, -2.0, 0.0, 0.3, 6.0, 1.1])[:b]
  return [np.float32(a) for a in (v, v_old, v_ref, x_t, x0, t, adv)]


MASKS = {"full": np.ones(6), "partial": np.array([1, 0, 1, 1, 0, 1.0]), "empty": np.zeros(6)}
# float32 vs float64 (helpers.float32_bound): means over d = 32, 3 reductions in sequence; e = (x_t - t v) - x0 cancels
# (|e| ~ 0.4 t, its operand ~ 1), so the rounding of x_t - t v is ~6x the largest gradient's (rows scale with t).
LOSS_BOUND = float32_bound(8 * 4, depth=3, condition=6)  # 1.4e-5


@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
@pytest.mark.parametrize("mode", nft.ADV_MODES)
@pytest.mark.parametrize("beta", [1.0, 0.7, 1.6])
def test_loss_and_gradient_equal_numpy(beta, mode, mask):
  v, v_old, v_ref, x_t, x0, t, adv = loss_inputs()
  m = np.float32(MASKS[mask])
  cfg = nft.NFTConfig(beta=beta, kl_weight=0.3, adv_mode=mode)  # a large KL weight so its gradient shows
  loss_fn = lambda v, v_old, v_ref: nft.nft_loss(v, v_old, v_ref, x_t, x0, t, adv, m, cfg)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(v, v_old, v_ref)
  ref_loss, ref_policy, ref_kl, ref_grad = np_nft(v, v_old, v_ref, x_t, x0, t, adv, m, beta=beta, kl_weight=0.3,
                                                  mode=mode)
  assert np.isfinite(np.asarray(loss)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
  if mask == "empty":
    assert float(loss) == 0.0 and not np.asarray(grads[0]).any()
    return
  assert abs(float(loss) - ref_loss) <= LOSS_BOUND * abs(ref_loss)
  assert abs(float(metrics["policy"]) - ref_policy) <= LOSS_BOUND * abs(ref_policy)
  assert abs(float(metrics["kl"]) - ref_kl) <= LOSS_BOUND * abs(ref_kl)
  assert max_rel_err(grads[0], ref_grad) <= LOSS_BOUND
  # v_old and v_ref are targets: no gradient flows into them
  assert not np.asarray(grads[1]).any() and not np.asarray(grads[2]).any()


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_weight_floor(beta):
  """A sample predicted exactly (on a dyadic grid, so float32 is exact) has weights at the floor and zero loss."""
  v, v_old, v_ref, x_t, x0, t, adv = loss_inputs()
  rng = np.random.default_rng(1)
  x0[2] = rng.integers(-8, 8, x0[2].shape) / 8
  v[2] = v_old[2] = rng.integers(-8, 8, v[2].shape) / 8
  t[2] = 0.5
  x_t[2] = x0[2] + 0.5 * v[2]
  cfg = nft.NFTConfig(beta=beta)
  terms = nft.nft_terms(v, v_old, v_ref, x_t, x0, t, nft.advantage_to_r(adv, cfg), cfg)
  assert float(terms["policy"][2]) == 0.0
  m = np.ones(6, np.float32)
  grad = jax.grad(lambda v: nft.nft_loss(v, v_old, v_ref, x_t, x0, t, adv, m, cfg)[0])(v)
  ref = np_nft(v, v_old, v_ref, x_t, x0, t, adv, m, beta=beta, kl_weight=1e-4, mode="all")[3]
  assert max_rel_err(grad, ref) <= LOSS_BOUND


def test_old_deviate_equals_numpy():
  v, v_old, v_ref, x_t, x0, t, adv = loss_inputs()
  cfg = nft.NFTConfig()
  terms = nft.nft_terms(v, v_old, v_ref, x_t, x0, t, nft.advantage_to_r(adv, cfg), cfg)
  expected = ((np.float64(v) - np.float64(v_old)) ** 2).mean(axis=(1, 2))
  np.testing.assert_allclose(terms["old_deviate"], expected, rtol=1e-6)


def test_r_from_advantages():
  adv = np.array([-9.0, -5.0, -1.0, 0.0, 2.5, 5.0, 12.0], np.float32)
  r = lambda mode: np.asarray(nft.advantage_to_r(adv, nft.NFTConfig(adv_mode=mode)))
  # float32 against exact decimals: a/c/2 + 0.5 rounds up to 3 times (two products, one sum; fused or not),
  # each at most half an ulp (6e-8 relative), and the literal itself is a half-ulp away: 4 half-ulps
  tol = dict(rtol=4 * 2.0 ** -24, atol=0)
  np.testing.assert_allclose(r("all"), [0, 0, 0.4, 0.5, 0.75, 1, 1], **tol)
  np.testing.assert_allclose(r("positive"), [0.5, 0.5, 0.5, 0.5, 0.75, 1, 1], **tol)
  np.testing.assert_allclose(r("negative"), [0, 0, 0.4, 0.5, 0.5, 0.5, 0.5], **tol)
  np.testing.assert_allclose(r("binary"), [0.4, 0.4, 0.4, 0.5, 0.6, 0.6, 0.6], **tol)
  np.testing.assert_array_equal(r("zero"), np.full(7, 0.5, np.float32))


def test_config_errors_name_the_field():
  for kw, field in [(dict(beta=0.0), "beta"), (dict(adv_mode="sign"), "adv_mode"), (dict(decay_schedule=3),
                                                                                      "decay_schedule")]:
    with pytest.raises(ValueError, match=field):
      nft.NFTConfig(**kw)
  assert nft.NFTConfig().train_timesteps(6) == 5
  with pytest.raises(ValueError, match="timestep_fraction"):
    nft.NFTConfig().train_timesteps(1)


# --------------------------------------------------------------------------------------------------
STEPS = np.array([0, 1, 2, 10, 74, 75, 76, 100, 208, 500, 501, 1000, 10_000])


def test_old_policy_decay_schedules():
  expected = {
      0: [0.0] * len(STEPS),
      1: [min(0.001 * s, 0.5) for s in STEPS],
      2: [0.0 if s < 75 else min(0.0075 * (s - 75), 0.999) for s in STEPS],
  }
  for schedule, values in expected.items():
    ours = [float(nft.old_policy_decay(s, schedule)) for s in STEPS]
    np.testing.assert_allclose(ours, values, rtol=1e-6, atol=1e-7)
  # hand-checked points: schedule 1 saturates at step 500, schedule 2 starts at 75 and saturates at 208.2
  assert float(nft.old_policy_decay(250, 1)) == pytest.approx(0.25)
  assert float(nft.old_policy_decay(75, 2)) == 0.0 and float(nft.old_policy_decay(175, 2)) == pytest.approx(0.75)
  assert float(nft.old_policy_decay(300, 2)) == pytest.approx(0.999)


def test_ema_decay_and_blend():
  np.testing.assert_allclose([float(nft.ema_decay(k, 0.9)) for k in (0, 1, 2, 10, 80, 81, 1000)],
                             [0.1, 2 / 11, 3 / 12, 11 / 20, 81 / 90, 0.9, 0.9], rtol=1e-6)
  out = nft.blend({"a": jnp.array([1.0, 2.0])}, {"a": jnp.array([3.0, 6.0])}, jnp.float32(0.25))
  np.testing.assert_allclose(out["a"], [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6])


# --------------------------------------------------------------------------------------------------
# The train step on the tiny FLUX transformer
LORA = LoraSpec(rank=4, alpha=8.0, targets=flux.DEFAULT_LORA_TARGETS)
TINY = flux.tiny().replace(num_layers=1, num_single_layers=1)  # one block of each kind keeps compiles short
B, GRID, REF_GRID, TXT, N = 4, (2, 2), (2, 3), 5, 3
# float32 rounding (helpers.float32_bound) of TINY: the time MLP's K = 256 is the longest reduction; a forward has 27
# in sequence (embedders 4, double block 12, single 8, norm_out 3), a gradient twice that (backward mirrors forward).
FORWARD_BOUND = float32_bound(256, depth=27)  # 2.0e-5
STEP_BOUND = float32_bound(256, depth=2 * 27)  # 2.8e-5


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def perturbed(tree, seed, scale=0.2):
  """Every leaf plus scale * N(0, 1) noise, drawn on the host (fast: nothing to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + scale * jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def random_transformer(cfg, seed=0):
  """A FLUX transformer with host-drawn random weights (building it eagerly would compile every initializer)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: flux.FluxTransformer(cfg, rngs=nnx.Rngs(0))))
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state)
  return nnx.merge(graphdef, perturbed(zeros, seed, 0.15))


COND_AXES = kontext.KontextCondition.logical_axes()
KONTEXT = (kontext.velocity, COND_AXES)  # what a policy takes of its family


def make_batch(cfg, b=B, seed=0, index_offset=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  cond = kontext.KontextCondition(
      reference=f32(b, REF_GRID[0] * REF_GRID[1], cfg.in_channels), text=f32(b, TXT, cfg.joint_attention_dim),
      pooled=f32(b, cfg.pooled_projection_dim), guidance=jnp.full((b,), 2.5, jnp.float32),
      img_ids=jnp.asarray(np.concatenate([latents.target_ids(*GRID), latents.reference_ids(*REF_GRID)])),
      txt_ids=jnp.zeros((TXT, 3), jnp.float32))
  sigmas = sampling.shifted_sigmas(N, GRID[0] * GRID[1])[:-1]
  return nft.TrainBatch(x0=f32(b, GRID[0] * GRID[1], cfg.in_channels), cond=cond,
                        sigmas=jnp.broadcast_to(jnp.asarray(sigmas), (b, N)),
                        advantages=jnp.asarray([1.5, -0.7, 3.0, -6.0][:b], jnp.float32),
                        mask=jnp.asarray([1.0, 1.0, 0.0, 1.0][:b]),
                        index=jnp.arange(index_offset, index_offset + b, dtype=jnp.int32))


def rows(batch, index, mask):
  """A micro-batch of the epoch `batch` (rollout i = row i), as the training loop gathers one."""
  sigmas = np.append(np.asarray(batch.sigmas[0]), 0.0)
  mask = np.asarray(mask, np.float32)
  return nft.gather_batch(batch.x0, batch.cond, COND_AXES, sigmas, index, np.asarray(batch.advantages)[index] * mask, mask)


@pytest.fixture(scope="module")
def lora_setup():
  cfg = TINY.replace(lora=LORA)
  policy, params, frozen = nft.Policy.from_model(random_transformer(cfg), *KONTEXT)  # B != 0: every adapter gets a gradient
  old = perturbed(params, 2, 0.05)  # the rollout policy differs from the current one
  trainer = nft.NFTTrainer(policy, nft.NFTConfig(kl_weight=0.05), abstract(params), abstract(frozen))
  return dict(cfg=cfg, policy=policy, params=params, old=old, frozen=frozen, trainer=trainer, batch=make_batch(cfg))


def fresh_state(setup, trainer=None):
  """A new train state (the step donates it) with the old policy set apart from the current one."""
  trainer = trainer or setup["trainer"]
  state = trainer.init(trainer.place(setup["params"], "params"))
  return state.replace(old_params=trainer.place(jax.tree.map(jnp.copy, setup["old"]), "params"))


KEY = jax.random.key(42)


def to_float64(tree):
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def test_gather_batch(lora_setup):
  batch = lora_setup["batch"]
  same = rows(batch, np.arange(B), np.ones(B))
  for a, b in zip(jax.tree.leaves(same.replace(mask=batch.mask)), jax.tree.leaves(batch)):
    np.testing.assert_array_equal(a, b)
  part = rows(batch, np.array([3, 1]), [1, 0])
  np.testing.assert_array_equal(part.x0, batch.x0[np.array([3, 1])])
  np.testing.assert_array_equal(part.cond.text, batch.cond.text[np.array([3, 1])])
  np.testing.assert_array_equal(part.index, [3, 1])
  np.testing.assert_array_equal(part.advantages, [batch.advantages[3], 0.0])
  with pytest.raises(ValueError, match="ending in 0"):
    nft.gather_batch(batch.x0, batch.cond, COND_AXES, np.asarray(batch.sigmas[0]), [0], [0.0], [1.0])


def test_step_gradient_equals_the_loss_through_three_separate_calls(lora_setup):
  """The accumulated gradient is that of the section-6 loss (masked mean over the epoch's terms), computed in
  float64 the public code's way: current adapter, old adapter and no adapter as three separate calls."""
  s = lora_setup
  policy, batch, cfg = s["policy"], s["batch"], s["trainer"].cfg
  state, metrics = s["trainer"].accumulate(fresh_state(s), s["frozen"], batch, KEY)
  ours = jax.tree.map(lambda g: g / state.term_count, state.grad_sum)
  num_terms = cfg.train_timesteps(N)
  times, noise = nft.draw_terms(KEY, batch.index, batch.sigmas, batch.x0.shape[1:], num_terms)

  with jax.enable_x64(True):
    params, old, frozen, b, times, noise = to_float64((s["params"], s["old"], s["frozen"], batch, times, noise))
    base = jax.tree.map(jnp.zeros_like, params)  # B = 0: every adapter is a no-op
    model = lambda p: nnx.merge(policy.graphdef, p, frozen)

    @jax.jit
    def term(params, t, eps):
      x_t = (1 - t)[:, None, None] * b.x0 + t[:, None, None] * eps
      v_old = kontext.velocity(model(old), x_t, t, b.cond)
      v_ref = kontext.velocity(model(base), x_t, t, b.cond)
      loss = lambda p: nft.nft_loss(kontext.velocity(model(p), x_t, t, b.cond), v_old, v_ref, x_t, b.x0, t,
                                    b.advantages, b.mask, cfg)[0]
      return jax.value_and_grad(loss)(params)

    losses, grads = zip(*[term(params, times[:, j], noise[j]) for j in range(num_terms)])
    expected = jax.tree.map(lambda *g: np.asarray(sum(g) / num_terms), *grads)  # the same kept count in every term
    mean_loss = float(np.mean(losses))
  assert float(metrics["terms"]) == 3 * num_terms
  assert abs(float(metrics["loss"]) - mean_loss) <= FORWARD_BOUND * abs(mean_loss)
  assert float(metrics["kl"]) > 0
  # measured 2.0e-6 to 3.9e-6 (max over leaves, CPUs differ): float32 rounding of forward and backward passes
  assert max(max_rel_err(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected))) <= STEP_BOUND


def test_micro_batching_does_not_change_the_update(lora_setup):
  """Rollouts 0, 1, 3 (2 is filtered out) in one micro-batch, or in two padded ones, give the same update."""
  s, trainer = lora_setup, lora_setup["trainer"]
  whole, _ = trainer.accumulate(fresh_state(s), s["frozen"], s["batch"], KEY)
  split = fresh_state(s)
  for index, mask in (([0, 1, 0, 1], [1, 1, 0, 0]), ([3, 3, 3, 3], [1, 0, 0, 0])):  # padding rows: mask 0
    split, _ = trainer.accumulate(split, s["frozen"], rows(s["batch"], np.array(index), mask), KEY)
  assert float(split.term_count) == float(whole.term_count) == 3 * trainer.cfg.train_timesteps(N)
  for a, b in zip(jax.tree.leaves(whole.grad_sum), jax.tree.leaves(split.grad_sum)):
    assert max_rel_err(a, b) <= STEP_BOUND  # other batch shapes: float32 rounding only (measured 2e-7)
  whole, _ = trainer.apply(whole)
  split, _ = trainer.apply(split)
  # step 1 moves each weight by lr * g / (|g| + 1e-8) ~ lr * sign(g): the gradients' rounding cancels, the
  # weights are a few ulps apart (2 eps = 1.2e-7; measured 2e-8)
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(split.params)):
    assert max_rel_err(a, b) <= 1e-6


def test_old_deviate_sums_give_the_epoch_mean_and_std(lora_setup):
  """Summed over micro-batches, the per-term divergence sums give the mean and std over the epoch's kept
  (sample, timestep) terms of mean((v - v_old)^2), here computed in float64 with separate calls."""
  s, trainer, batch = lora_setup, lora_setup["trainer"], lora_setup["batch"]
  state, total, total_sq, terms = fresh_state(s), 0.0, 0.0, 0.0
  for index, mask in (([0, 1, 0, 1], [1, 1, 0, 0]), ([3, 3, 3, 3], [1, 0, 0, 0])):  # rollout 2 filtered out
    state, metrics = trainer.accumulate(state, s["frozen"], rows(batch, np.array(index), mask), KEY)
    total += float(metrics["old_deviate_sum"])
    total_sq += float(metrics["old_deviate_sq_sum"])
    terms += float(metrics["terms"])
  mean = total / terms
  std = np.sqrt(total_sq / terms - mean ** 2)

  num_terms = trainer.cfg.train_timesteps(N)
  times, noise = nft.draw_terms(KEY, batch.index, batch.sigmas, batch.x0.shape[1:], num_terms)
  with jax.enable_x64(True):
    params, old, frozen, b, times, noise = to_float64((s["params"], s["old"], s["frozen"], batch, times, noise))
    model = lambda p: nnx.merge(s["policy"].graphdef, p, frozen)

    @jax.jit
    def deviate(t, eps):
      x_t = (1 - t)[:, None, None] * b.x0 + t[:, None, None] * eps
      v, v_old = (kontext.velocity(model(p), x_t, t, b.cond) for p in (params, old))
      return jnp.mean(jnp.square(v - v_old), axis=(1, 2))

    expected = np.stack([np.asarray(deviate(times[:, j], noise[j])) for j in range(num_terms)], axis=1)[[0, 1, 3]]
  assert terms == expected.size
  # measured 8e-7 for both: the float32 velocities
  assert abs(mean - expected.mean()) <= 1e-5 * expected.mean()
  assert abs(std - expected.std()) <= 1e-5 * expected.std()


def accumulate_and_apply(trainer, state, frozen, batch, key=KEY):
  """An epoch of one micro-batch, as train_step does it (train_step is compiled once, in the sharded test)."""
  state, metrics = trainer.accumulate(state, frozen, batch, key)
  state, applied = trainer.apply(state)
  return state, {**metrics, **applied}


def test_step_updates_params_ema_and_old_policy(lora_setup):
  s, trainer = lora_setup, lora_setup["trainer"]
  p0 = s["params"]
  state, metrics = accumulate_and_apply(trainer, fresh_state(s), s["frozen"], s["batch"])
  assert bool(metrics["finite"]) and bool(metrics["applied"]) and int(state.step) == 1
  assert float(metrics["grad_norm"]) > 0 and float(metrics["kept_fraction"]) == 0.75
  assert float(metrics["x0_norm"]) == pytest.approx(
      np.mean([np.sqrt(np.mean(np.square(s["batch"].x0[i]))) for i in (0, 1, 3)]), rel=1e-6)
  p1 = jax.tree.map(np.array, state.params)  # update_old donates the state
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0))) > 0
  d = 2 / 11  # ema decay after the first step: (1 + 1) / (10 + 1)
  for e, a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(p0), jax.tree.leaves(p1)):
    np.testing.assert_allclose(e, d * a + (1 - d) * b, rtol=1e-6, atol=1e-7)
  assert float(state.term_count) == 0 and not any(np.asarray(g).any() for g in jax.tree.leaves(state.grad_sum))
  state, old_metrics = trainer.update_old(state)
  eta = 0.001  # schedule 1 after one step
  assert float(old_metrics["old_decay"]) == pytest.approx(eta)
  for o, a, b in zip(jax.tree.leaves(state.old_params), jax.tree.leaves(s["old"]), jax.tree.leaves(p1)):
    np.testing.assert_allclose(o, eta * a + (1 - eta) * b, rtol=1e-6, atol=1e-7)


def test_non_finite_update_is_flagged_and_skipped(lora_setup):
  s, trainer = lora_setup, lora_setup["trainer"]
  batch = s["batch"].replace(x0=s["batch"].x0.at[0, 0, 0].set(jnp.nan))
  state, metrics = accumulate_and_apply(trainer, fresh_state(s), s["frozen"], batch)
  assert not bool(metrics["finite"]) and not bool(metrics["applied"]) and int(state.step) == 0
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(s["params"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(s["params"])):
    np.testing.assert_array_equal(a, b)
  assert float(state.term_count) == 0 and np.isfinite(np.asarray(jax.tree.leaves(state.grad_sum)[0])).all()


def test_empty_mask_is_a_no_op(lora_setup):
  s, trainer = lora_setup, lora_setup["trainer"]
  batch = s["batch"].replace(mask=jnp.zeros((B,)))
  state, metrics = accumulate_and_apply(trainer, fresh_state(s), s["frozen"], batch)
  assert float(metrics["loss"]) == 0.0 and float(metrics["terms"]) == 0.0
  assert bool(metrics["finite"]) and not bool(metrics["applied"]) and int(state.step) == 0
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(s["params"])):
    np.testing.assert_array_equal(a, b)


def test_sharded_step_equals_single_device(lora_setup):
  assert len(jax.devices()) >= 8, "conftest sets 8 host devices"
  s = lora_setup
  mesh = shd.make_mesh((2, 2, 2))
  sharded = nft.NFTTrainer(s["policy"], s["trainer"].cfg, abstract(s["params"]), abstract(s["frozen"]), mesh=mesh)
  state, metrics = sharded.train_step(fresh_state(s, sharded), sharded.place(s["frozen"], "frozen"),
                                      sharded.place(s["batch"], "batch"), KEY)
  single, single_metrics = accumulate_and_apply(s["trainer"], fresh_state(s), s["frozen"], s["batch"])
  for k in ("loss", "policy", "kl", "grad_norm"):  # sharded sums in another order (measured 5e-7)
    assert abs(float(metrics[k]) - float(single_metrics[k])) <= STEP_BOUND * abs(float(single_metrics[k]))
  err = lambda x, y: max(max_rel_err(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  # step 1 moves each weight by lr * g / (|g| + 1e-8) ~ lr * sign(g): the gradients' rounding cancels, the
  # weights are a few ulps apart (2 eps = 1.2e-7; measured 4e-8)
  for name in ("params", "ema_params", "old_params"):
    assert err(getattr(state, name), getattr(single, name)) <= 1e-6
  # Adam's moments are the gradient (mu) and its square (nu: condition 2): measured 3.3e-6 to 3.8e-6
  assert err(state.opt_state, single.opt_state) <= float32_bound(256, depth=2 * 27, condition=2)  # 5.6e-5

  # every parameter-shaped leaf (params, old, EMA, Adam moments, accumulator) stays where its logical axes say
  declared = nft.tree_shardings(abstract(s["params"]), mesh)
  for tree in (state.params, state.old_params, state.ema_params, state.grad_sum, state.opt_state[1][0].mu,
               state.opt_state[1][0].nu):
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(declared)):
      assert leaf.sharding.spec == sharding.spec
  to_q = state.params["transformer_blocks"]["stacked"]["attn"]["to_q"]  # (blocks, adapters, ...)
  assert to_q["lora_a"][...].sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", None)
  assert to_q["lora_b"][...].sharding.spec == jax.sharding.PartitionSpec(None, None, None, "tensor")
  with pytest.raises(ValueError, match="data x fsdp"):
    sharded.place(rows(s["batch"], np.arange(3), np.ones(3)), "batch")  # 3 rows over 4 devices


def test_full_finetune_step():
  cfg = TINY.replace(num_single_layers=0)
  policy, params, frozen = nft.Policy.from_model(random_transformer(cfg), *KONTEXT, full_finetune=True)
  trainer = nft.NFTTrainer(policy, nft.NFTConfig(), abstract(params), abstract(frozen))
  state = trainer.init(params)
  state = state.replace(old_params=perturbed(params, 3, 0.01))
  state, metrics = trainer.train_step(state, frozen, make_batch(cfg), KEY)
  assert bool(metrics["applied"]) and float(metrics["kl"]) > 0  # v_ref comes from the frozen copy
  changed = lambda path: float(jnp.abs(path(state.params)[...] - path(frozen)[...]).max()) > 0
  # base weights train (not only adapters); the frozen reference copy is a separate buffer, untouched
  assert changed(lambda p: p["x_embedder"]["kernel"]) and changed(lambda p: p["proj_out"]["kernel"])
  assert changed(lambda p: p["transformer_blocks"]["stacked"]["attn"]["to_q"]["kernel"])
  np.testing.assert_array_equal(frozen["x_embedder"]["kernel"][...], params["x_embedder"]["kernel"][...])
  with pytest.raises(ValueError, match="LoraSpec"):
    nft.Policy.from_model(nnx.eval_shape(lambda: flux.FluxTransformer(TINY.replace(lora=LORA), rngs=nnx.Rngs(0))),
                          *KONTEXT, full_finetune=True)
  with pytest.raises(ValueError, match="LoraSpec"):
    nft.Policy.from_model(nnx.eval_shape(lambda: flux.FluxTransformer(TINY, rngs=nnx.Rngs(0))), *KONTEXT)


def test_zero_advantages_give_no_policy_gradient_at_the_old_policy():
  """The control mode: with every r = 0.5, L_pos and L_neg pull v equally both ways around v_old, so at v = v_old
  only the KL term has a gradient (kl_weight 0 here: none at all)."""
  v, v_old, v_ref, x_t, x0, t, adv = loss_inputs()
  m = np.ones(len(adv), np.float32)

  def gradient_at_old(mode):
    cfg = nft.NFTConfig(kl_weight=0.0, adv_mode=mode)
    return np.abs(np.asarray(jax.grad(lambda v: nft.nft_loss(v, v_old, v_ref, x_t, x0, t, adv, m, cfg)[0])(v_old)))

  assert gradient_at_old("zero").max() < 1e-6
  assert gradient_at_old("all").max() > 1e-3  # the same point with the rewards' advantages: a real gradient
