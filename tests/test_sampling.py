"""Schedules and solvers against diffusers and against NumPy float64 loops written from docs/METHOD.md section 3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import float32_bound, max_rel_err

from editr1_jax import sampling

B, L, C = 3, 5, 4
_rng = np.random.default_rng(0)
W = _rng.standard_normal((C, C)) / np.sqrt(C)
BIAS = _rng.standard_normal(C)


def velocity_jax(z, sigma):
  """A nonlinear, sigma-dependent field, so solver errors cannot cancel."""
  return jnp.tanh(z @ jnp.asarray(W, jnp.float32) + sigma * jnp.asarray(BIAS, jnp.float32)) + 0.5 * z


def velocity_np(z, sigma):
  return np.tanh(z @ W + sigma * BIAS) + 0.5 * z


def noise(seed=1):
  return np.random.default_rng(seed).standard_normal((B, L, C))


SIGMAS = sampling.shifted_sigmas(6, 1024)


# --------------------------------------------------------------------------------------------------
FLUX_SCHEDULER = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, shift=3.0,
                      use_dynamic_shifting=True)
# Qwen-Image(-Edit-2509)'s scheduler/scheduler_config.json: a longer token range, a smaller max shift, and the
# schedule stretched to end at 0.02.
QWEN_SCHEDULER = dict(base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift=1.0,
                      use_dynamic_shifting=True, shift_terminal=0.02, time_shift_type="exponential")
SCHEDULERS = {"flux": FLUX_SCHEDULER, "qwen_image": QWEN_SCHEDULER,
              "linear": dict(FLUX_SCHEDULER, time_shift_type="linear", shift_terminal=0.1),
              "static": dict(shift=3.0, use_dynamic_shifting=False), "static_terminal": dict(shift=2.0, shift_terminal=0.05)}


def diffusers_sigmas(config: dict, steps: int, tokens: int, shift: sampling.ShiftConfig) -> np.ndarray:
  """`set_timesteps` as the FLUX and Qwen-Image pipelines call it (linspace sigmas, mu from the token count)."""
  from diffusers import FlowMatchEulerDiscreteScheduler
  sched = FlowMatchEulerDiscreteScheduler(**config)
  mu = shift.mu(tokens) if config.get("use_dynamic_shifting") else None
  sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
  return sched.sigmas.numpy()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("steps,tokens", [(6, 1024), (28, 4096), (10, 256), (3, 77), (6, 6889)])
def test_schedule_equals_diffusers(name, steps, tokens):
  from diffusers import FlowMatchEulerDiscreteScheduler
  config = dict(FlowMatchEulerDiscreteScheduler(**SCHEDULERS[name]).config)  # every field, as a folder has them
  shift = sampling.ShiftConfig.from_diffusers_config(config)
  ours = sampling.shifted_sigmas(steps, tokens, shift)
  assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
  # The same float32 operations in the same order as diffusers: at most an ulp apart (exp/divide rounding).
  np.testing.assert_allclose(ours, diffusers_sigmas(config, steps, tokens, shift), rtol=2.4e-7, atol=0)
  if config.get("shift_terminal"):
    # 1 - (1 - terminal) in float32: off by an ulp of 1.0 at most
    assert ours[-2] == pytest.approx(config["shift_terminal"], rel=0, abs=2.0 ** -23)


def test_flux_folder_gives_flux_shift():
  from diffusers import FlowMatchEulerDiscreteScheduler
  config = dict(FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).config)
  assert sampling.ShiftConfig.from_diffusers_config(config) == sampling.ShiftConfig(shift=3.0)
  np.testing.assert_array_equal(sampling.shifted_sigmas(6, 1024, sampling.ShiftConfig.from_diffusers_config(config)),
                                SIGMAS)


def test_reference_512_schedule():
  # docs/METHOD.md section 3: 512x512 -> 1024 tokens, 6 steps
  np.testing.assert_allclose(SIGMAS, [1, .9037, .7897, .6525, .4842, .2730, 0], atol=5e-5)


@pytest.mark.parametrize("field,value", [("use_karras_sigmas", True), ("invert_sigmas", True),
                                         ("stochastic_sampling", True), ("time_shift_type", "cosine"),
                                         ("shift_terminal", "0.02"), ("max_shift", True)])
def test_scheduler_config_errors_name_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    sampling.ShiftConfig.from_diffusers_config({"use_dynamic_shifting": True, field: value}, source="s.json")


# --------------------------------------------------------------------------------------------------
def np_euler(z, sigmas):
  for s, t in zip(sigmas[:-1], sigmas[1:]):
    z = z + (t - s) * velocity_np(z, s)
  return z


def np_dpm2m(z, sigmas):
  """DPM-Solver++(2M) as written in docs/METHOD.md section 3, with lambda and r spelled out."""
  sigmas = np.asarray(sigmas, np.float64)
  n = len(sigmas) - 1
  x0_prev = None
  for i in range(n):
    s, t = sigmas[i], sigmas[i + 1]
    x0 = z - s * velocity_np(z, s)
    if i == 0 or i == n - 1:
      z = (1 - t) * x0 + t * (z - (1 - s) * x0) / s  # DDIM
    else:
      lam = lambda x: np.log(1 - x) - np.log(x)
      alpha_t = 1 - t
      h = lam(t) - lam(s)
      d1 = 0.0
      if sigmas[i - 1] < 1:  # at sigma = 1, lambda = -inf: r = inf, D1 = 0
        r = (lam(s) - lam(sigmas[i - 1])) / h
        d1 = (x0 - x0_prev) / r
      z = (t / s) * z - alpha_t * (np.exp(-h) - 1) * x0 - 0.5 * alpha_t * (np.exp(-h) - 1) * d1
    x0_prev = x0
  return z


def np_sde(z, sigmas, eps, a):
  for i, (s, t) in enumerate(zip(sigmas[:-1], sigmas[1:])):
    dt = t - s
    std = a * np.sqrt(s / (1 - (sigmas[1] if s == 1 else s)))
    v = velocity_np(z, s)
    z = z * (1 + std ** 2 * dt / (2 * s)) + v * (1 + std ** 2 * (1 - s) / (2 * s)) * dt + std * np.sqrt(-dt) * eps[i]
  return z


@pytest.mark.parametrize("sigmas", [SIGMAS, sampling.shifted_sigmas(28, 4096), np.linspace(1, 0, 5)],
                         ids=["flux6", "flux28", "linear4"])
def test_euler_equals_numpy(sigmas):
  z = noise()
  ours = sampling.sample(velocity_jax, jnp.asarray(z, jnp.float32), sigmas, solver="euler")
  assert max_rel_err(ours.x0, np_euler(z, np.float64(sigmas))) <= 1e-6
  np.testing.assert_array_equal(ours.sigmas, sigmas)


@pytest.mark.parametrize("sigmas", [SIGMAS, sampling.shifted_sigmas(28, 4096), np.linspace(1, 0, 3),
                                    np.array([0.8, 0.6, 0.35, 0.1, 0.0])], ids=["flux6", "flux28", "two", "below1"])
def test_dpm2m_equals_numpy(sigmas):
  z = noise()
  ours = sampling.sample(velocity_jax, jnp.asarray(z, jnp.float32), sigmas, solver="dpm2").x0
  # float32 sigmas in both (the schedule is float32), float64 arithmetic in the reference
  assert max_rel_err(ours, np_dpm2m(z, np.float64(np.float32(sigmas)))) <= 1e-6


def test_dpm2m_single_and_second_order_steps_differ():
  """The second-order correction really acts on the middle steps (else DPM2M would equal DDIM)."""
  _, _, c_d = sampling.dpm2m_coefficients(jnp.asarray(SIGMAS))
  c_d = np.asarray(c_d)
  assert c_d[0] == 0 and c_d[-1] == 0  # DDIM first and last
  assert c_d[1] == 0  # after the sigma = 1 step
  assert np.all(c_d[2:-1] != 0)


def test_dpm2m_last_step_lands_on_x0():
  c_z, c_x, c_d = (np.asarray(c) for c in sampling.dpm2m_coefficients(jnp.asarray(SIGMAS)))
  assert (c_z[-1], c_x[-1], c_d[-1]) == (0.0, 1.0, 0.0)


def test_no_inf_or_nan_anywhere():
  z = jnp.asarray(noise(), jnp.float32)
  with jax.debug_nans(True), jax.debug_infs(True):
    for solver in ("euler", "dpm2"):
      out = sampling.sample(velocity_jax, z, SIGMAS, solver=solver).x0
      assert np.isfinite(np.asarray(out)).all()
    keys = jax.random.split(jax.random.key(0), B)
    out = sampling.sample(velocity_jax, z, SIGMAS, solver="sde", keys=keys, noise_level=0.7).x0
    assert np.isfinite(np.asarray(out)).all()
    coeffs = sampling.dpm2m_coefficients(jnp.asarray(SIGMAS))
    assert all(np.isfinite(np.asarray(c)).all() for c in coeffs)


# --------------------------------------------------------------------------------------------------
def test_sde_equals_numpy_with_the_same_noise():
  z = noise()
  keys = jax.random.split(jax.random.key(3), B)
  eps = [np.asarray(sampling.initial_noise(jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), (L, C)), np.float64)
         for i in range(len(SIGMAS) - 1)]
  ours = sampling.sample(velocity_jax, jnp.asarray(z, jnp.float32), SIGMAS, solver="sde", keys=keys,
                         noise_level=0.7).x0
  assert max_rel_err(ours, np_sde(z, np.float64(SIGMAS), eps, 0.7)) <= 1e-6


def test_sde_without_noise_is_euler():
  z = jnp.asarray(noise(), jnp.float32)
  keys = jax.random.split(jax.random.key(0), B)
  sde = sampling.sample(velocity_jax, z, SIGMAS, solver="sde", keys=keys, noise_level=0.0).x0
  ode = sampling.sample(velocity_jax, z, SIGMAS, solver="euler").x0
  assert max_rel_err(sde, ode) <= 1e-6


def test_sde_needs_keys_and_unknown_solver_is_an_error():
  z = jnp.asarray(noise(), jnp.float32)
  with pytest.raises(ValueError, match="keys"):
    sampling.sample(velocity_jax, z, SIGMAS, solver="sde")
  with pytest.raises(ValueError, match="heun"):
    sampling.sample(velocity_jax, z, SIGMAS, solver="heun")


def test_per_sample_randomness_does_not_depend_on_the_batch():
  keys = jax.random.split(jax.random.key(7), B)
  full = sampling.initial_noise(keys, (L, C))
  alone = sampling.initial_noise(keys[1:2], (L, C))
  np.testing.assert_array_equal(full[1:2], alone)
  assert full.shape == (B, L, C)
  sde_full = sampling.sample(velocity_jax, full, SIGMAS, solver="sde", keys=keys).x0
  sde_alone = sampling.sample(velocity_jax, alone, SIGMAS, solver="sde", keys=keys[1:2]).x0
  np.testing.assert_allclose(sde_full[1:2], sde_alone, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
def test_kontext_velocity_runs_the_transformer_on_target_and_reference_tokens():
  from test_nft import TINY, random_transformer

  from editr1_jax import latents
  from editr1_jax.families import kontext
  cfg = TINY
  model = random_transformer(cfg)
  rng = np.random.default_rng(0)
  n_txt = 5
  cond = kontext.KontextCondition(
      reference=jnp.asarray(rng.standard_normal((2, 6, cfg.in_channels)), jnp.float32),
      text=jnp.asarray(rng.standard_normal((2, n_txt, cfg.joint_attention_dim)), jnp.float32),
      pooled=jnp.asarray(rng.standard_normal((2, cfg.pooled_projection_dim)), jnp.float32),
      guidance=jnp.full((2,), 2.5, jnp.float32),
      img_ids=jnp.asarray(np.concatenate([latents.target_ids(2, 2), latents.reference_ids(2, 3)])),
      txt_ids=jnp.zeros((n_txt, 3), jnp.float32))
  z = jnp.asarray(rng.standard_normal((2, 4, cfg.in_channels)), jnp.float32)
  sigmas = sampling.shifted_sigmas(3, 4)

  @jax.jit
  def velocity(z, sigma):  # the transformer on [target | reference], target tokens kept
    full = model(hidden_states=jnp.concatenate([z, cond.reference], 1), encoder_hidden_states=cond.text,
                 pooled_projections=cond.pooled, timestep=sigma, img_ids=cond.img_ids, txt_ids=cond.txt_ids,
                 guidance=cond.guidance)
    return full[:, :4]

  out = sampling.sample(lambda z, s: kontext.velocity(model, z, jnp.broadcast_to(s, (2,)), cond), z, sigmas,
                        solver="dpm2")
  # other programs around the same math: float32 rounding of 3 transformer calls (27 reductions each, see test_nft)
  bound = float32_bound(256, depth=(len(sigmas) - 1) * 27)  # 3.4e-5; measured 6.5e-7
  assert max_rel_err(out.x0, sampling.dpm_solver_2m(velocity, z, jnp.asarray(sigmas))) <= bound
  assert out.x0.shape == z.shape


def test_true_cfg_equals_the_qwen_pipeline_formula():
  """QwenImageEditPlusPipeline's guidance step, written in torch as the pipeline's loop does it."""
  rng = np.random.default_rng(3)
  pos, neg = rng.standard_normal((2, 2, 5, 8)).astype(np.float32)
  scale = np.array([4.0, 1.5], np.float32)
  tp, tn = torch.from_numpy(pos), torch.from_numpy(neg)
  comb = tn + torch.from_numpy(scale)[:, None, None] * (tp - tn)
  ref = (comb * (torch.norm(tp, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))).numpy()
  ours = np.asarray(sampling.true_cfg(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(scale)))
  # a norm over 8 values, a product and a quotient: float32_bound(8, depth=3)
  assert max_rel_err(ours, ref) <= float32_bound(8, depth=3)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), np.linalg.norm(pos, axis=-1), rtol=1e-5)
  # scale 1: n + (p - n) = p up to the rounding of that difference
  assert max_rel_err(sampling.true_cfg(jnp.asarray(pos), jnp.asarray(neg), jnp.ones(2)), pos) <= float32_bound(8, 3)
